"""The errors fastser raises for what a user can fix (the commands print each as one line, exit 2).

Library code raises these; `fastser.cli` maps them to the commands' one error line. The data and
audio errors (`fastser.data.CorpusError`, `fastser.audio.AudioError`) live beside what they check.
"""


class UserError(Exception):
    """An input the user can fix; its message is printed as the single error line."""
