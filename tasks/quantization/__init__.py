"""How a float model becomes an integer one: the converter's options and the methods that prepare the model or
choose the ranges (activation ranges, equalization, bias correction)."""
