"""Image folders for evaluation: torchvision's ImageFolder layout, read as a stranger's folder.

`ImageFolderDataset(root, ...)` reads ROOT/<class>/**/<image> as `torchvision.datasets.ImageFolder` does -- classes
are the sub-folders of ROOT in sorted order, numbered from 0; samples are the files with an image extension
(`IMG_EXTENSIONS`, any case) below each class folder, symbolic links followed, in the same order -- with these
rules, so that a folder cannot hang a command, count an image twice or shift labels without a word:

* an entry named like an image that is not a regular file (a FIFO, socket, device or broken link) is skipped, all
  of them named in one warning; an image is opened without blocking and read only if it is a regular file;
* a symbolic link loop, a folder reached twice, or the same file (same device and inode: a hard or symbolic link)
  reached twice is refused (`ImageFolderError`), naming both paths;
* `num_classes`: the model's class count; a folder with another number of class folders is refused (a missing
  folder would shift the label of every later class). An empty class folder is a class without images: accepted;
* `class_names`: the model's class names where they are recorded; the sorted folder names must be the same;
* every failure to read, decode or transform one image (truncated file, `PIL.Image.DecompressionBombError`, not an
  image, unreadable) is one `ImageReadError` naming the image -- also from DataLoader worker processes when the
  loader comes from `image_loader`;
* `img_mode`: the PIL mode images are converted to, 'RGB' or 'L' (`image_mode(channels)`, as timm's train.py
  chooses it from the model's input channels).

Errors are ValueErrors (`ImageFolderError`, `ImageReadError`) or, from the operating system, OSErrors naming the
path; nothing here prints.
"""
import errno
import os
import stat
import warnings
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple, Union

import torch
from PIL import Image
from timm.data import create_transform
from torch.utils.data import DataLoader, Dataset, Subset, default_collate
from torchvision.datasets.folder import IMG_EXTENSIONS  # the image files torchvision's ImageFolder reads

from timm_sila._checks import first_line, listing
from .memory import check_batch_fits

__all__ = ['ImageFolderDataset', 'ImageFolderError', 'ImageReadError', 'IMG_EXTENSIONS', 'image_mode',
           'image_loader', 'eval_loader']

_IMAGE_MODES = {1: 'L', 3: 'RGB'}
_SHOWN = 3  # paths named in one message before "+N more"


class ImageFolderError(ValueError):
    """An image folder that cannot be evaluated as it is: no class folder or no image, a symbolic link loop, a
    folder or file reached twice, or classes that do not match the model's."""


class ImageReadError(ValueError):
    """One image cannot be read, decoded or transformed; the message names it."""


def image_mode(channels: int) -> str:
    """The PIL mode that gives a model taking `channels` input channels its images: 'RGB' for 3, 'L' for 1 (as timm's
    train.py: input_img_mode = 'RGB' if input_size[0] == 3 else 'L'). Other counts: ValueError."""
    if channels not in _IMAGE_MODES:
        raise ValueError(f'The model takes {channels} input channels; image folders give 1 (grayscale, mode L) or 3 '
                         f'(RGB). Evaluate it with a data loader of your own.')
    return _IMAGE_MODES[channels]


def _kind(mode: int) -> str:
    for test, name in ((stat.S_ISFIFO, 'a FIFO'), (stat.S_ISSOCK, 'a socket'), (stat.S_ISCHR, 'a character device'),
                       (stat.S_ISBLK, 'a block device'), (stat.S_ISDIR, 'a folder')):
        if test(mode):
            return name
    return 'not a regular file'


def _file_id(st: os.stat_result) -> Optional[Tuple[int, int]]:
    return (st.st_dev, st.st_ino) if st.st_ino else None  # a file system without inode numbers: not compared


def _scan_class(class_dir: str, root_id: Optional[Tuple[int, int]], seen_dirs: Dict[Any, str],
                seen_files: Dict[Any, str], skipped: List[str]) -> List[str]:
    """The image files below `class_dir` in torchvision's order (folders sorted by path, files by name)."""
    listed: List[Tuple[str, List[str]]] = []
    stack = [(class_dir, (root_id,) if root_id is not None else ())]  # (folder, ids of the folders above it)
    while stack:
        folder, above = stack.pop()
        st = os.stat(folder)
        fid = _file_id(st)
        if fid is not None:
            if fid in above:
                raise ImageFolderError(f'{folder} is a symbolic link loop: it leads back to {seen_dirs[fid]}, a folder '
                                       f'above it, so its images would be counted again and again; remove the link.')
            if fid in seen_dirs:
                raise ImageFolderError(f'{folder} and {seen_dirs[fid]} are the same folder (one is a link to the '
                                       f'other), so its images would be counted twice; remove one of them.')
            seen_dirs[fid] = folder
        names = []
        with os.scandir(folder) as entries:
            for entry in entries:
                try:
                    is_dir = entry.is_dir()  # follows symbolic links, as os.walk(followlinks=True)
                except OSError:
                    is_dir = False
                if is_dir:
                    stack.append((entry.path, above + ((fid,) if fid is not None else ())))
                elif entry.name.lower().endswith(IMG_EXTENSIONS):
                    names.append(entry.name)
        listed.append((folder, names))
    images = []
    for folder, names in sorted(listed):
        for name in sorted(names):
            path = os.path.join(folder, name)
            try:
                st = os.stat(path)
            except FileNotFoundError:
                skipped.append(f'{path} (a broken link)')
                continue
            except OSError as e:
                if e.errno == errno.ELOOP:
                    raise ImageFolderError(f'{path} is a symbolic link loop; remove the link.') from None
                raise
            if not stat.S_ISREG(st.st_mode):
                skipped.append(f'{path} ({_kind(st.st_mode)})')
                continue
            fid = _file_id(st)
            if fid is not None:
                if fid in seen_files:
                    raise ImageFolderError(f'{path} and {seen_files[fid]} are the same file (a hard or symbolic '
                                           f'link), so it would be counted twice; remove one of them.')
                seen_files[fid] = path
            images.append(path)
    return images


def _check_classes(root: str, classes: List[str], num_classes: Optional[int],
                   class_names: Optional[Sequence[str]]) -> None:
    if num_classes is not None and len(classes) != num_classes:
        hidden = [c for c in classes if c.startswith('.')]
        if len(classes) > num_classes:
            what = ('remove the folders that are not classes of the model'
                    + (f' (hidden folders such as {hidden[0]} count as classes too)' if hidden else ''))
        else:
            what = ('a missing class folder would shift the label of every later class (classes are numbered by '
                    'sorted folder name); create an empty folder for each class without images')
        raise ImageFolderError(f'{root} has {len(classes)} class folders but the model predicts {num_classes} '
                               f'classes: {what}.')
    if class_names is not None:
        names = [str(n) for n in class_names]
        if len(names) != len(classes):
            raise ImageFolderError(f'{root} has {len(classes)} class folders but the model records '
                                   f'{len(names)} class names; evaluate on the data set it was trained on.')
        wrong = [i for i, (c, n) in enumerate(zip(classes, names)) if c != n]
        if wrong:
            i = wrong[0]
            order = (' The model\'s names are not in sorted order, so folder numbering cannot match them.'
                     if sorted(names) == classes else '')
            raise ImageFolderError(f'{root}: class {i} of the model is {names[i]!r}, but folder {i} (in sorted '
                                   f'order) is {classes[i]!r} ({len(wrong)} of {len(classes)} classes differ): name '
                                   f'the class folders as the model\'s classes.{order}')


def _open_image(path: str, mode: str):
    """The image at `path`, decoded and converted to `mode`; opened without blocking (a FIFO put in place of a
    file since the folder was scanned is refused, not waited on)."""
    fd = os.open(path, os.O_RDONLY | getattr(os, 'O_NONBLOCK', 0) | getattr(os, 'O_CLOEXEC', 0)
                 | getattr(os, 'O_BINARY', 0))
    try:
        kind = os.fstat(fd).st_mode
        if not stat.S_ISREG(kind):
            raise OSError(f'it is {_kind(kind)}')
    except BaseException:
        os.close(fd)
        raise
    with os.fdopen(fd, 'rb') as f, Image.open(f) as img:
        return img.convert(mode)  # decodes every pixel: a truncated or corrupt file fails here


class ImageFolderDataset(Dataset):
    """(image, class index) pairs of an ImageFolder-layout folder, with the rules in this module's docstring.

    Attributes as torchvision's ImageFolder: `classes` (sorted folder names), `class_to_idx`, `samples` [(path,
    index)], `targets`; plus `skipped` (entries named like images that are not regular files). Raises
    ImageFolderError (a ValueError) for the folder's problems, OSError from the system (e.g. permission denied).
    """

    def __init__(self, root: Union[str, Path], transform: Optional[Callable] = None, img_mode: str = 'RGB',
                 num_classes: Optional[int] = None, class_names: Optional[Sequence[str]] = None):
        self.root = str(root)
        self.transform = transform
        self.img_mode = img_mode
        if not os.path.isdir(self.root):
            raise ImageFolderError(f'{self.root} is not a folder: expected ImageFolder layout '
                                   f'{self.root}/<class>/<image>.')
        with os.scandir(self.root) as entries:
            classes = sorted(e.name for e in entries if e.is_dir())
        if not classes:
            raise ImageFolderError(f'{self.root} has no class folder: expected ImageFolder layout '
                                   f'{self.root}/<class>/<image>.')
        _check_classes(self.root, classes, num_classes, class_names)
        self.classes = classes
        self.class_to_idx = {c: i for i, c in enumerate(classes)}
        root_id = _file_id(os.stat(self.root))
        seen_dirs: Dict[Any, str] = {root_id: self.root} if root_id is not None else {}
        seen_files: Dict[Any, str] = {}
        self.skipped: List[str] = []
        self.samples: List[Tuple[str, int]] = []
        for c in classes:
            for path in _scan_class(os.path.join(self.root, c), root_id, seen_dirs, seen_files, self.skipped):
                self.samples.append((path, self.class_to_idx[c]))
        self.targets = [t for _, t in self.samples]
        if self.skipped:
            entries = 'entry' if len(self.skipped) == 1 else 'entries'
            warnings.warn(f'{self.root}: skipped {len(self.skipped)} {entries} named like images that are not '
                          f'regular files: {listing(self.skipped, _SHOWN)}.', UserWarning, stacklevel=2)
        if not self.samples:
            raise ImageFolderError(f'{self.root} is empty: its {len(classes)} class folders hold no image '
                                   f'({", ".join(IMG_EXTENSIONS)}).')

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int):
        path, target = self.samples[index]
        try:
            img = _open_image(path, self.img_mode)
        except Exception as e:  # PIL raises many types (OSError, SyntaxError, DecompressionBombError, ...)
            raise ImageReadError(f'cannot read image {path} ({type(e).__name__}: {first_line(e)}); remove or '
                                 f'replace it.') from None
        if self.transform is not None:
            try:
                img = self.transform(img)
            except Exception as e:
                raise ImageReadError(f'cannot transform image {path} of {img.size[0]}x{img.size[1]} pixels '
                                     f'({type(e).__name__}: {first_line(e)}).') from None
        return img, target


# --- loading in batches, worker processes included --------------------------------------------------------------
class _Failed:
    """A sample that could not be loaded, carried to the main process as data (picklable) instead of an exception,
    which torch would re-raise with the worker's whole traceback in its message."""
    __slots__ = ('message',)

    def __init__(self, message: str):
        self.message = message

    def __getstate__(self):
        return self.message

    def __setstate__(self, state):
        self.message = state


class _Guarded(Dataset):
    def __init__(self, dataset: Dataset):
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: int):
        try:
            return self.dataset[index]
        except ImageReadError as e:
            return _Failed(str(e))


def _collate(batch: List[Any]):
    failed = next((b for b in batch if isinstance(b, _Failed)), None)
    return failed if failed is not None else default_collate(batch)


class _ImageLoader(DataLoader):
    """A DataLoader whose iteration raises ImageReadError, with the message of the image, where one failed."""

    def __iter__(self):
        for batch in super().__iter__():
            if isinstance(batch, _Failed):
                raise ImageReadError(batch.message)
            yield batch


def image_loader(dataset: Dataset, batch_size: int, workers: int = 0, limit: Optional[int] = None,
                 pin_memory: bool = False) -> DataLoader:
    """A DataLoader over `dataset` in its order (no shuffling); `limit`: at most that many samples, a fixed random
    choice (seed 0). A failure to read an image is one ImageReadError naming it, with or without workers."""
    if limit is not None and limit < len(dataset):
        order = torch.randperm(len(dataset), generator=torch.Generator().manual_seed(0))[:limit]
        dataset = Subset(dataset, order.tolist())
    return _ImageLoader(_Guarded(dataset), batch_size=batch_size, shuffle=False, num_workers=workers,
                        pin_memory=pin_memory, collate_fn=_collate)


def eval_loader(root: Union[str, Path], model: torch.nn.Module, data_config: Dict[str, Any], batch_size: int,
                workers: int = 0, limit: Optional[int] = None, device: Union[str, torch.device, None] = None,
                class_names: Optional[Sequence[str]] = None) -> DataLoader:
    """The loader that evaluates `model` on the image folder `root`: timm's eval transform of `data_config`
    (`resolve_data_config` form), images in the mode its input channels need (`image_mode`), the folder's classes
    checked against the model's `num_classes` (and `class_names` where recorded), at most `limit` images, and the
    batch -- `batch_size`, or all images when fewer -- checked against the memory available on the CPU and on
    `device` (`timm_sila.data.memory.check_batch_fits`: MemoryBoundError, a ValueError)."""
    input_size = tuple(data_config['input_size'])
    num_classes = getattr(model, 'num_classes', None)
    dataset = ImageFolderDataset(root, transform=create_transform(**data_config, is_training=False),
                                 img_mode=image_mode(input_size[0]),
                                 num_classes=num_classes if isinstance(num_classes, int) and num_classes > 0 else None,
                                 class_names=class_names)
    batch = min(batch_size, len(dataset) if limit is None else min(limit, len(dataset)))
    device = torch.device(device) if device is not None else None
    on_cpu = device is None or device.type == 'cpu'
    check_batch_fits(batch, input_size, model if on_cpu else None)  # on another device only the batch is in RAM
    if not on_cpu:
        check_batch_fits(batch, input_size, model, device=device)
    return image_loader(dataset, batch_size, workers=workers, limit=limit,
                        pin_memory=device is not None and device.type == 'cuda')
