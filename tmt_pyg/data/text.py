"""Text corpora through HuggingFace ``datasets`` (hub or local files) and word/char vocabularies."""
import json
from pathlib import Path
from typing import Iterable, Optional, Union

import torch
from torch import Tensor

HUB_CONFIGS = {"wikitext-2": "wikitext-2-v1", "wikitext-2-v1": "wikitext-2-v1", "wikitext-2-raw-v1": "wikitext-2-raw-v1"}
SPLIT_FILES = {"train": "train.txt", "validation": "valid.txt", "test": "test.txt"}


def load_text_splits(name: str, data_dir: Optional[str] = None, cache_dir: Optional[str] = None) -> dict[str, list[str]]:
    """Load a corpus as ``{split: lines}`` (lines without their trailing newline).

    Without ``data_dir``: the hub dataset ``wikitext`` with the config for ``name`` (see ``HUB_CONFIGS``).
    With ``data_dir``: the ``datasets`` "text" builder on ``train.txt`` / ``valid.txt`` / ``test.txt``
    (whichever exist) in ``data_dir/name`` if that folder exists, else in ``data_dir`` itself.
    ``cache_dir`` defaults to the ``datasets`` cache in the user's home.
    """
    import datasets  # deferred: importing datasets costs seconds and most users of tmt_pyg never need it

    if data_dir is None:
        if name not in HUB_CONFIGS:
            raise ValueError(f"unknown hub corpus {name!r}; choose one of {sorted(HUB_CONFIGS)} or pass data_dir")
        try:
            ds = datasets.load_dataset("wikitext", HUB_CONFIGS[name], cache_dir=cache_dir)
        except (ConnectionError, OSError) as e:
            raise ConnectionError(f"could not load {name!r} from the HuggingFace hub ({e}); "
                                  "offline, pass data_dir=<folder with train.txt/valid.txt/test.txt>") from e
    else:
        root = Path(data_dir) / name if (Path(data_dir) / name).is_dir() else Path(data_dir)
        if not root.is_dir():
            raise FileNotFoundError(f"data directory {root} does not exist")
        files = {split: root / f for split, f in SPLIT_FILES.items() if (root / f).is_file()}
        if "train" not in files:
            raise FileNotFoundError(f"{root / SPLIT_FILES['train']} not found")
        for path in files.values():
            if path.stat().st_size == 0:
                raise ValueError(f"{path} is empty")
        ds = datasets.load_dataset("text", data_files={s: str(p) for s, p in files.items()}, cache_dir=cache_dir)
    return {split: [line.rstrip("\n") for line in ds[split]["text"]] for split in ds}


class WordVocab:
    """Word-level vocabulary: whitespace split, one ``eos`` after every line (the WikiText convention).

    ``encode(lines)`` gives a 1-D LongTensor stream; words not in the vocabulary map to ``unk``.
    """
    sep = " "  # joins units in decode

    def __init__(self, itos: list[str], eos: str = "<eos>", unk: Optional[str] = "<unk>"):
        assert len(set(itos)) == len(itos), "vocabulary entries must be unique"
        assert not itos or eos in itos, f"eos token {eos!r} must be in the vocabulary"
        self.itos, self.eos, self.unk = list(itos), eos, unk
        self.stoi = {s: i for i, s in enumerate(self.itos)}

    def units(self, line: str) -> list[str]:
        return line.split() + [self.eos]

    @classmethod
    def build(cls, lines: Iterable[str], **kwargs) -> "WordVocab":
        """Vocabulary of every unit in ``lines``, in order of first appearance."""
        units = cls([], **kwargs).units
        return cls(list(dict.fromkeys(u for line in lines for u in units(line))), **kwargs)

    def __len__(self) -> int:
        return len(self.itos)

    def encode(self, lines: Iterable[str]) -> Tensor:
        units = [u for line in lines for u in self.units(line)]
        try:
            ids = [self.stoi[u] for u in units]
        except KeyError as e:
            if self.unk not in self.stoi:
                raise KeyError(f"{e.args[0]!r} is not in the vocabulary and the vocabulary has no unknown token "
                               f"(unk={self.unk!r})") from None
            unk_id = self.stoi[self.unk]
            ids = [self.stoi.get(u, unk_id) for u in units]
        return torch.tensor(ids, dtype=torch.long)

    def decode(self, ids: Union[Tensor, list[int]]) -> str:
        ids = ids.tolist() if isinstance(ids, Tensor) else ids
        return self.sep.join(self.itos[i] for i in ids)

    def save(self, path: Union[str, Path]) -> None:
        data = {"kind": type(self).__name__, "itos": self.itos, "eos": self.eos, "unk": self.unk}
        Path(path).write_text(json.dumps(data, ensure_ascii=False), encoding="utf-8")

    @classmethod
    def load(cls, path: Union[str, Path]) -> "WordVocab":
        data = json.loads(Path(path).read_text(encoding="utf-8"))
        kind = data.pop("kind")
        if kind != cls.__name__:
            raise ValueError(f"{path} holds a {kind}, not a {cls.__name__}")
        return cls(**data)


class CharVocab(WordVocab):
    """Character-level vocabulary (e.g. Tiny Shakespeare): every character, ``"\\n"`` after every line."""
    sep = ""

    def __init__(self, itos: list[str], eos: str = "\n", unk: Optional[str] = None):
        super().__init__(itos, eos, unk)

    def units(self, line: str) -> list[str]:
        return list(line) + [self.eos]
