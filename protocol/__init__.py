"""Wire and register formats, sans-IO: construct Structs, enums and pure functions.

Nothing here imports trio, cffi, vfuserver or vfuserver.devices; every module covers one
spec area and can be used (and tested) on bytes alone.
"""
