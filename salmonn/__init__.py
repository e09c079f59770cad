"""The SALMONN tools, installed under one namespace.

`salmonn.conversion`, `salmonn.training`, `salmonn.inference` and `salmonn.evaluation` live in the repository's
top-level folders of the same names (mapped by `setup.py`); the model itself is the top-level package
`modeling_salmonn`, because its files are also the remote code saved next to every checkpoint.
"""

__version__ = "0.1.0"
