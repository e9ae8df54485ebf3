"""Writing a manifest's files from the block store into a folder: checked, atomic, contained.

For each selected file (``include``/``exclude`` are shell globs on manifest paths, as
``lattica fetch --include/--exclude`` will take them):

* the path is checked again and walked one component at a time from the output folder with
  ``O_NOFOLLOW`` (:mod:`lattica.content.contained_write`, shared with tensor selections): a
  symlink planted anywhere inside the output folder (``x -> /etc``) is refused
  (:class:`~lattica.content.errors.UnsafePathError`), never followed, so nothing is ever
  written outside the folder;
* the bytes are streamed from the chunks (one chunk in memory), through SHA-256, into a
  temporary file in the final directory; if the whole-file SHA-256 differs from the manifest's
  the file is not written (:class:`~lattica.content.errors.ChunkMismatchError`);
* the temporary file is fsynced, given the manifest's mode, and renamed over the final name:
  never a half-written file under its final name.

Blocking (file system work): call :func:`export_files` on a worker thread, or :func:`export`.
"""

from __future__ import annotations

import fnmatch
from collections.abc import Sequence
from pathlib import Path

from lattica.content.block_store import BlockStore
from lattica.content.blocking_io import run_blocking
from lattica.content.contained_write import open_output_folder, write_contained
from lattica.content.file_assembly import temporary_name
from lattica.content.manifest import FileEntry, Manifest
from lattica.content.tensor_select import TensorSelection, selected_pieces


def select_files(manifest: Manifest, include: Sequence[str] = (), exclude: Sequence[str] = ()) -> list[FileEntry]:
    """Files whose path matches an ``include`` glob (all when none is given) and no ``exclude``
    glob (:func:`fnmatch.fnmatchcase`: ``*`` also matches ``/``)."""
    return [
        entry
        for entry in manifest.files
        if (not include or any(fnmatch.fnmatchcase(entry.path, p) for p in include))
        and not any(fnmatch.fnmatchcase(entry.path, p) for p in exclude)
    ]


def export_files(
    store: BlockStore,
    files: Sequence[FileEntry],
    out_dir: Path,
    selections: Sequence[TensorSelection] = (),
    *,
    tag: str | None = None,
) -> list[Path]:
    """Write ``files`` (entries of a checked manifest) whole, and each of ``selections`` as a
    safetensors file of just its tensors, under ``out_dir`` (created if missing); returns the
    paths written. Both go through :func:`~lattica.content.contained_write.write_contained`
    (no symlink followed, the manifest's mode); a tensor selection cannot be checked against
    the file's SHA-256, only its chunks against their ids. ``tag`` (a fetch's, see
    :func:`~lattica.content.file_assembly.temporary_name`) names the temporary files of
    tensor selections. Blocking. Raises
    :class:`UnsafePathError`, :class:`ChunkMismatchError`,
    :class:`~lattica.content.errors.ChunkNotFoundError` (a chunk not stored),
    :class:`~lattica.storage.DiskFullError` and ``OSError``."""
    with open_output_folder(out_dir) as root_fd:
        written = [
            write_contained(
                root_fd, out_dir, entry.path, store.iter_file(entry.chunks), mode=entry.mode, sha256=entry.sha256
            )
            for entry in files
        ]
        for selection in selections:
            pieces = selected_pieces(selection, store.read_block)
            path = selection.file.path
            # With the fetch's tag, a kill -9 leaves a name the next fetch knows to remove.
            temporary = None if tag is None else temporary_name(path, tag)
            written.append(
                write_contained(root_fd, out_dir, path, pieces, mode=selection.file.mode, temporary=temporary)
            )
        return written


async def export(
    store: BlockStore, manifest: Manifest, out_dir: Path, *, include: Sequence[str] = (), exclude: Sequence[str] = ()
) -> list[Path]:
    """:func:`export_files` for the files :func:`select_files` picks, off the event loop."""
    files = select_files(manifest, include, exclude)
    return await run_blocking(lambda: export_files(store, files, Path(out_dir)))
