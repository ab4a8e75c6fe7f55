"""The error and warning of dataset loading, shared by :mod:`revelio_nb.data` and :mod:`revelio_nb.image_folders`."""


class DatasetError(ValueError):
    """A dataset could not be found, read or split."""


class DatasetWarning(UserWarning):
    """A dataset was loaded, but some files were skipped or converted (the message lists them)."""
