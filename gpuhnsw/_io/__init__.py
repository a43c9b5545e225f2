"""Index files, one module per job: ``state`` (the state dict every format reads into and writes
from, and its checks), ``files`` (atomic writes, temporary files and their locks, checksummed
ranges), ``native`` (gpuhnsw's own format, mapped loads, and ``read_index`` for either format),
``pickles`` (the state of a pickle or ``Index(dict)``, ours or hnswlib's),
``hnswlib_format`` (hnswlib 0.8.0's ``save_index`` format) and ``bfindex`` (``BFIndex``'s two
formats).
"""
