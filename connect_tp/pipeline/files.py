"""Safe files for runs, re-exported from :mod:`connect_tp.files` where they now live."""
from ..files import (CheckpointError, ResultError, atomic_save, atomic_write, atomic_write_json,  # noqa: F401
                     check_output_folder, current_umask, file_mode, load_checkpoint, read_json, sha256_file)

__all__ = ["CheckpointError", "ResultError", "atomic_write", "atomic_save", "atomic_write_json", "read_json",
           "load_checkpoint", "sha256_file", "file_mode", "current_umask", "check_output_folder"]
