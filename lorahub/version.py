"""lorahub's version, in a module of its own: records (:func:`lorahub.export.versions`) read it without
importing the package's ``__init__`` (which imports the API, which imports the records' writer)."""

__version__ = "0.1.0"
