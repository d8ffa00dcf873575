"""Tasks with embedded data and the code that trains and compares optimizers on them."""
