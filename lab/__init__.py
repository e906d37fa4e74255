"""The accuracy lab beside the package (never shipped): the experiment queue and its plans
(experiments.py, plans/), results kept from full runs and baselines (accuracy.py), late fusion with
the openSMILE baseline scored from queue units (fusion.py), and the README's and docs' tables
generated from benchmarks/results/ (report.py). Its results live in benchmarks/results/accuracy/."""
