"""gpuhnsw: HNSW approximate nearest-neighbour search, hnswlib-compatible, with GPU search.

``import gpuhnsw as hnswlib`` runs existing hnswlib code unchanged.
"""
from ._errors import DeviceError, IndexFileError, IndexFileNotFoundError, InputShapeError
from .index import Index
from .bruteforce import BFIndex
from .knn_graph import knn_graph

__version__ = "0.1.0"

__all__ = ["Index", "BFIndex", "knn_graph", "IndexFileError", "IndexFileNotFoundError", "InputShapeError", "DeviceError", "__version__"]
