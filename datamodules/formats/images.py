"""Image files for the release readers: decoding with the file bytes kept, and image sources
(folders, tar archives, tars split into ``.tar.split.NNN`` parts) indexed by member name.

A release that ships its images in archives names them by relative path in its annotation files
(ImgEdit's parquet: ``results_remove_laion_part5/<id>/original.png``). :class:`ImageIndex` reads
each archive's member list once and resolves such a path with :meth:`ImageIndex.resolve`:

1. the path as it is;
2. else a member whose name with its first folder stripped is the path (the archive or folder
   holds one more top folder, e.g. the user extracted ``Singleturn/`` into the folder passed);
3. else the path with its own first folder stripped (the archive lacks the row's top folder).

A path that step 2 would give to more than one member resolves to none (reported as missing), so
a path never silently picks one of two images; a name two sources both hold is the first source's.
Only files with an image extension that PIL knows are indexed (a release folder also holds parquet,
JSON and checkpoints). The members no resolved path used are :meth:`ImageIndex.unreferenced`.

Split archives are read as the concatenation of their parts in part-number order (what upstream's
``cat a.tar.split.* > a.tar`` writes), through :class:`ChainedParts`, without writing it to disk.
"""

from __future__ import annotations

import bisect
import io
import os
import re
import tarfile
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

from PIL import Image

from datamodules.samples import ORIGINAL_BYTES, DataConfigError

SPLIT_PART = re.compile(r"^(?P<archive>.+\.tar)\.split\.(?P<number>\d+)$")
"""A part of a split tar: ``<archive>.tar.split.NNN``."""


def decode_image(data: bytes, what: str) -> Image.Image:
    """The image ``data`` holds, its bytes kept under :data:`ORIGINAL_BYTES`; raises ValueError naming ``what``."""
    try:
        with Image.open(io.BytesIO(data)) as image:
            image.load()
            decoded = image.copy()
    except OSError as error:
        raise ValueError(f"{what} does not decode: {error}") from error
    decoded.info[ORIGINAL_BYTES] = data
    return decoded


def as_rgb(image: Image.Image) -> Image.Image:
    """``image`` in RGB; the original bytes survive only where the conversion is a no-op (a JPEG stays itself)."""
    rgb = image.convert("RGB")
    if image.mode == "RGB" and ORIGINAL_BYTES in image.info:
        rgb.info[ORIGINAL_BYTES] = image.info[ORIGINAL_BYTES]
    return rgb


class ChainedParts(io.RawIOBase):
    """The byte concatenation of ``parts`` (files, in order) as one read-only seekable file."""

    def __init__(self, parts: Sequence[Path]) -> None:
        super().__init__()
        self.parts = list(parts)
        self.starts = [0]
        for part in self.parts:
            self.starts.append(self.starts[-1] + part.stat().st_size)
        self.position = 0
        self.handles: dict[int, io.BufferedReader] = {}

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def tell(self) -> int:
        return self.position

    def seek(self, offset: int, whence: int = io.SEEK_SET) -> int:
        base = {io.SEEK_SET: 0, io.SEEK_CUR: self.position, io.SEEK_END: self.starts[-1]}[whence]
        self.position = max(0, base + offset)
        return self.position

    def readinto(self, buffer: bytearray | memoryview) -> int:  # type: ignore[override]
        # Fills the buffer across part boundaries: tarfile takes a short read for the end of the file.
        view, filled = memoryview(buffer), 0
        while filled < len(view) and self.position < self.starts[-1]:
            part = bisect.bisect_right(self.starts, self.position) - 1
            if part not in self.handles:
                self.handles[part] = self.parts[part].open("rb")
            handle = self.handles[part]
            handle.seek(self.position - self.starts[part])
            wanted = min(len(view) - filled, self.starts[part + 1] - self.position)
            count = handle.readinto(view[filled : filled + wanted])
            if not count:
                raise OSError(f"{self.parts[part]} is shorter than when it was opened")
            filled, self.position = filled + count, self.position + count
        return filled

    def close(self) -> None:
        for handle in self.handles.values():
            handle.close()
        super().close()


@dataclass(frozen=True)
class Member:
    """Where one image lives: the plain file ``source`` (``member`` None) or a member of the tar ``source``."""

    source: str
    member: str | None = None


def _is_image(name: str) -> bool:
    return PurePosixPath(name).suffix.lower() in Image.registered_extensions()


def _strip_top(name: str) -> str | None:
    parts = PurePosixPath(name).parts
    return "/".join(parts[1:]) if len(parts) > 1 else None


def split_archives(paths: Iterable[Path]) -> tuple[list[Path], dict[str, list[Path]]]:
    """``paths`` as (other files, split archive name -> its parts in part order).

    Raises:
        DataConfigError: a split archive whose part numbers are not 0, 1, 2, ... (a part is missing).
    """
    others: list[Path] = []
    numbered: dict[str, list[tuple[int, Path]]] = {}
    for path in paths:
        match = SPLIT_PART.match(str(path))
        if match:
            numbered.setdefault(match["archive"], []).append((int(match["number"]), path))
        else:
            others.append(path)
    archives: dict[str, list[Path]] = {}
    for archive, parts in numbered.items():
        parts = sorted(set(parts))  # a part named twice (a folder and a glob) counts once
        numbers = [number for number, _ in parts]
        if numbers != list(range(len(numbers))):
            raise DataConfigError(f"split archive {archive}: parts {numbers} given; parts 0..{numbers[-1]} must all be there")
        archives[archive] = [path for _, path in parts]
    return others, archives


def _is_archive(path: Path) -> bool:
    return path.name.endswith(".tar") or SPLIT_PART.match(path.name) is not None


class ImageIndex:
    """The images of folders, tars and split tars by member name (see the module docstring).

    A folder's plain files are indexed by their path relative to it; its ``.tar`` and
    ``.tar.split.NNN`` files are opened as archives, whose members keep their names in the archive.

    Raises:
        DataConfigError: a path that does not exist, a file that is neither a tar nor a split part,
            an archive that does not open as a tar, or a split archive with a part missing.
    """

    def __init__(self, paths: Sequence[str | os.PathLike[str]]) -> None:
        self.members: dict[str, Member] = {}
        self.tars: dict[str, tarfile.TarFile] = {}
        self.used: set[str] = set()
        archives: list[Path] = []
        for path in map(Path, paths):
            if path.is_dir():
                files = sorted(p for p in path.rglob("*") if p.is_file())
                archives.extend(p for p in files if _is_archive(p))
                for file in (p for p in files if _is_image(p.name)):
                    self.members.setdefault(file.relative_to(path).as_posix(), Member(str(file)))
            elif path.is_file() and _is_archive(path):
                archives.append(path)
            elif path.is_file():
                raise DataConfigError(f"--images {path}: not a folder, a .tar or a .tar.split.NNN part")
            else:
                raise DataConfigError(f"--images {path}: no such file or folder")
        plain, split = split_archives(archives)
        for archive in plain:
            self._add_tar(str(archive), archive.open("rb"))
        for archive, parts in split.items():
            self._add_tar(f"{archive}.split.*", ChainedParts(parts))
        self.stripped: dict[str, str | None] = {}
        for name in self.members:
            short = _strip_top(name)
            if short is not None:
                # None marks a short name that two members share: it resolves to neither.
                self.stripped[short] = None if short in self.stripped else name

    def _add_tar(self, label: str, stream: io.IOBase) -> None:
        try:
            tar = tarfile.open(fileobj=stream, mode="r:")  # type: ignore[arg-type]
            members = [m for m in tar.getmembers() if m.isfile() and _is_image(m.name)]
        except tarfile.TarError as error:
            raise DataConfigError(f"--images {label}: not a readable tar archive ({error})") from error
        self.tars[label] = tar
        for member in members:
            self.members.setdefault(member.name.removeprefix("./"), Member(label, member.name))

    def resolve(self, path: str) -> str | None:
        """The member name ``path`` refers to (rules 1-3 of the module docstring), marked as used; or None."""
        name: str | None = path if path in self.members else self.stripped.get(path)
        if name is None:
            short = _strip_top(path)
            name = short if short in self.members else None
        if name is not None:
            self.used.add(name)
        return name

    def read(self, name: str) -> bytes:
        """The bytes of the member ``name`` (a name :meth:`resolve` returned)."""
        where = self.members[name]
        if where.member is None:
            return Path(where.source).read_bytes()
        handle = self.tars[where.source].extractfile(where.member)
        assert handle is not None, "only regular files are indexed"
        return handle.read()

    def where(self, name: str) -> str:
        """The archive or file holding member ``name``."""
        return self.members[name].source

    def unreferenced(self) -> list[str]:
        """Members no resolved path used, in index order."""
        return [name for name in self.members if name not in self.used]
