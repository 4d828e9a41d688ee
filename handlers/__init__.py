"""TorchServe handlers for tsforge.

Inside a `.mar` this package travels as an extra file, and each model's entry module
(`<kind>_handler.py`) sits beside it at the top of the archive, importing `handlers.*` absolutely.
"""
