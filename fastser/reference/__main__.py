from fastser.reference.pipeline import main

main()
