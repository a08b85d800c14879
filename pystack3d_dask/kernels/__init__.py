"""Pure array kernels: numpy in, numpy out (``xp``-generic where noted).

Nothing here knows about dask, files or stores.
"""
