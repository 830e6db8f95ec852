"""Real image-caption pairs for the text-to-image GAN (DMD2 Sec. 4.3 and 5.2): found on disk, encoded once, cached.

DMD2's GAN compares generator samples with real images of the same kind of caption, in the teacher's latent space.
Both the VAE and the text encoders are frozen, so each pair is encoded exactly once (:func:`prepare_t2i_cache`,
``dmd2lab prepare-t2i``) and training reads only latents and caption embeddings (:func:`load_t2i_cache`), which
:func:`dmd2lab.t2i.build_t2i_distillation` takes as ``real_latents`` / ``real_conditions``.

Where pairs come from (:func:`list_pairs`):

- a folder of images with same-stem captions (``cat.jpg`` + ``cat.txt``), and/or ``metadata.jsonl`` /
  ``captions.jsonl`` files with one ``{"file_name": "cat.jpg", "text": "a cat"}`` per line, as Hugging Face's
  imagefolder reads them (``file_name`` relative to the .jsonl's folder; a ``.txt`` beside the image wins);
- webdataset tar shards (``000.jpg`` + ``000.txt`` in a ``.tar``), a folder of them or one shard, read with
  Python's ``tarfile``.

The cache is a folder of safetensors shards plus ``index.json``, which records the model (source, kind, resolution,
latent shape) and the data it was made from, so a cache is never silently used with another model. Shards and
index are written atomically, one shard at a time: an interrupted run is resumed by running it again.
"""
from __future__ import annotations

import hashlib
import io
import json
import os
import tarfile
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Sequence

import numpy as np
import torch
from torch import Tensor

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".webp", ".bmp")
METADATA_FILES = ("metadata.jsonl", "captions.jsonl")
INDEX = "index.json"
FORMAT = "dmd2lab-t2i-cache/1"
_LAYOUT = ("put image files with same-stem captions in it (cat.jpg + cat.txt), or a metadata.jsonl with one "
           '{"file_name": "cat.jpg", "text": "a cat"} per line, or webdataset .tar shards (000.jpg + 000.txt inside)')


@dataclass(frozen=True)
class Pair:
    """One image and its caption: ``source`` is the image file, or the tar shard holding ``member``."""

    key: str
    caption: str
    source: Path
    member: str | None = None


# ------------------------------------------------------------------------------------------- finding pairs
def list_pairs(data: str | Path) -> list[Pair]:
    """Every (image, caption) pair under ``data`` (a folder, or one .tar shard), in a fixed order (sorted paths), so
    a cache's shards always hold the same pairs. Raises with what to put where when there are none, or when an image
    has no caption."""
    data = Path(data).expanduser()
    if not data.exists():
        raise FileNotFoundError(f"data {data} does not exist; make it a folder and {_LAYOUT}")
    if data.is_file():
        if not tarfile.is_tarfile(data):
            raise ValueError(f"data {data} is a file but no tar shard; pass a folder or a .tar shard: {_LAYOUT}")
        return _shard_pairs(data, data.parent)
    pairs = _folder_pairs(data)
    for shard in sorted(p for p in data.rglob("*.tar") if not _hidden(p, data)):
        pairs += _shard_pairs(shard, data)
    if not pairs:
        raise ValueError(f"data folder {data} holds no images or .tar shards; {_LAYOUT}")
    return pairs


def write_captioned_images(images: Tensor, captions: Sequence[str], folder: str | Path) -> Path:
    """Write uint8 images (N x C x H x W, C = 1 or 3) as PNGs with same-stem .txt captions: the folder layout
    :func:`list_pairs` reads, e.g. a labelled dataset captioned with its class names for a small local run."""
    from PIL import Image
    if images.dtype != torch.uint8 or images.ndim != 4 or images.shape[1] not in (1, 3):
        raise ValueError(f"images must be uint8 N x C x H x W with C = 1 or 3; got {images.dtype} "
                         f"{tuple(images.shape)}")
    if len(captions) != images.shape[0]:
        raise ValueError(f"one caption per image: {images.shape[0]} images, {len(captions)} captions")
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    for i, (image, caption) in enumerate(zip(images, captions)):
        Image.fromarray(image.permute(1, 2, 0).squeeze(-1).numpy()).convert("RGB").save(folder / f"{i:06d}.png")
        (folder / f"{i:06d}.txt").write_text(caption)
    return folder


def _hidden(path: Path, root: Path) -> bool:
    return any(part.startswith(".") for part in path.relative_to(root).parts)


def _folder_pairs(root: Path) -> list[Pair]:
    images = sorted(p for p in root.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file()
                    and not _hidden(p, root))
    captions = _metadata_captions(root)
    pairs, uncaptioned = [], []
    for image in images:
        text_file = image.with_suffix(".txt")
        caption = text_file.read_text(encoding="utf-8").strip() if text_file.is_file() else captions.get(image)
        if caption is None:
            uncaptioned.append(image.relative_to(root))
        else:
            pairs.append(Pair(str(image.relative_to(root)), caption, image))
    if uncaptioned:
        shown = ", ".join(map(str, uncaptioned[:5])) + (f" and {len(uncaptioned) - 5} more" if len(uncaptioned) > 5
                                                         else "")
        first = uncaptioned[0]
        raise ValueError(f"{len(uncaptioned)} image(s) in {root} have no caption: {shown}. Put each caption in a "
                         f"same-stem .txt beside its image ({root / first.with_suffix('.txt')}), or a line "
                         f'{{"file_name": "{first.as_posix()}", "text": "..."}} in {root / "metadata.jsonl"}')
    return pairs


def _metadata_captions(root: Path) -> dict[Path, str]:
    """Captions from every metadata.jsonl / captions.jsonl under ``root`` (HF imagefolder: ``file_name`` is relative
    to the .jsonl's own folder)."""
    captions = {}
    for name in METADATA_FILES:
        for meta in sorted(p for p in root.rglob(name) if not _hidden(p, root)):
            for number, line in enumerate(meta.read_text(encoding="utf-8").splitlines(), 1):
                if not line.strip():
                    continue
                try:
                    row = json.loads(line)
                    image, text = meta.parent / row["file_name"], row["text"]
                except (json.JSONDecodeError, KeyError, TypeError) as e:
                    raise ValueError(f"{meta} line {number} is not a JSON object with 'file_name' and 'text' "
                                     f"({type(e).__name__}: {e}); write it as "
                                     '{"file_name": "cat.jpg", "text": "a cat"}') from e
                if not image.is_file():
                    raise FileNotFoundError(f"{meta} line {number} names {row['file_name']}, but {image} does not "
                                            "exist; put the image there or remove the line")
                captions[image] = str(text).strip()
    return captions


def _shard_pairs(shard: Path, root: Path) -> list[Pair]:
    """A webdataset shard's pairs: members grouped by key (the path up to the first dot of the file name), each
    key's image (jpg/jpeg/png/webp) with its ``txt`` caption."""
    groups: dict[str, dict[str, tarfile.TarInfo]] = {}
    try:
        with tarfile.open(shard) as tar:
            for member in tar.getmembers():
                if member.isfile():
                    folder, _, name = member.name.rpartition("/")
                    stem, dot, ext = name.partition(".")
                    if dot:
                        groups.setdefault(f"{folder}/{stem}" if folder else stem, {})[ext.lower()] = member
            pairs, uncaptioned = [], []
            for key in sorted(groups):
                files = groups[key]
                image = next((files[e] for e in ("jpg", "jpeg", "png", "webp") if e in files), None)
                if image is None:
                    continue
                if "txt" not in files:
                    uncaptioned.append(key)
                    continue
                caption = tar.extractfile(files["txt"]).read().decode("utf-8").strip()
                pairs.append(Pair(f"{shard.relative_to(root)}:{key}", caption, shard, image.name))
    except (tarfile.TarError, OSError, EOFError) as e:
        raise ValueError(f"cannot read tar shard {shard} ({type(e).__name__}: {e}); re-create or remove it") from e
    if uncaptioned:
        raise ValueError(f"tar shard {shard} has {len(uncaptioned)} image(s) without a caption: "
                         f"{', '.join(uncaptioned[:5])}; each key needs KEY.txt beside KEY.jpg in the shard")
    return pairs


# ------------------------------------------------------------------------------------------- reading images
class ImageReader:
    """Reads pairs' image bytes, keeping each tar shard open while it is read (a shard is read in order)."""

    def __init__(self):
        self._tars: dict[Path, tarfile.TarFile] = {}

    def read(self, pair: Pair) -> bytes:
        if pair.member is None:
            return pair.source.read_bytes()
        if pair.source not in self._tars:
            self.close()  # pairs come shard by shard: one open shard at a time
            self._tars[pair.source] = tarfile.open(pair.source)
        return self._tars[pair.source].extractfile(pair.member).read()

    def close(self):
        for tar in self._tars.values():
            tar.close()
        self._tars.clear()


def load_image(data: bytes, resolution: int, name: str = "image") -> Tensor:
    """An image as a (3, resolution, resolution) tensor in [-1, 1]: RGB, the shorter side resized to ``resolution``
    (bicubic), then center-cropped — the model's native square, as the generator's samples are."""
    from PIL import Image, UnidentifiedImageError
    try:
        with Image.open(io.BytesIO(data)) as opened:
            image = opened.convert("RGB")  # decodes the whole file: a truncated one fails here
    except (UnidentifiedImageError, OSError, ValueError) as e:
        detail = "no image format PIL decodes" if isinstance(e, UnidentifiedImageError) else f"{type(e).__name__}: {e}"
        raise ValueError(f"cannot read image {name} ({detail}); replace it, or delete it and its caption") from e
    scale = resolution / min(image.size)
    size = tuple(max(resolution, round(side * scale)) for side in image.size)
    image = image.resize(size, Image.Resampling.BICUBIC)
    left, top = (size[0] - resolution) // 2, (size[1] - resolution) // 2
    image = image.crop((left, top, left + resolution, top + resolution))
    return torch.from_numpy(np.asarray(image).copy()).permute(2, 0, 1).float() / 127.5 - 1


# --------------------------------------------------------------------------------------------- encoding
@torch.no_grad()
def encode_pairs(parts, conditioner, images: Tensor, captions: Sequence[str]) -> dict[str, Tensor]:
    """One batch encoded as the UNet sees it: VAE latents x ``scaling_factor`` (the posterior mean: the cache is
    made once, so a single draw of the VAE's small posterior noise would only be frozen into it) and the captions'
    conditions (:meth:`dmd2lab.t2i.TextConditioner.encode`), flattened to ``latents`` and dotted condition names.
    The VAE runs in float32: SDXL's overflows in float16."""
    vae = parts.vae
    if vae.dtype != torch.float32:
        vae.float()
    latents = vae.encode(images.to(conditioner.device, torch.float32)).latent_dist.mode()
    tensors = {"latents": latents * vae.config.scaling_factor}
    tensors.update(flatten(conditioner.encode(list(captions))))
    return {k: v.float().cpu().contiguous() for k, v in tensors.items()}


def flatten(conditions: dict, prefix: str = "") -> dict[str, Tensor]:
    """A nested conditions dict as ``{"added_cond_kwargs.text_embeds": ...}`` (safetensors holds flat names)."""
    flat = {}
    for k, v in conditions.items():
        flat.update(flatten(v, f"{prefix}{k}.") if isinstance(v, dict) else {f"{prefix}{k}": v})
    return flat


def unflatten(flat: dict[str, Tensor]) -> dict:
    """The inverse of :func:`flatten`."""
    nested: dict = {}
    for name, value in flat.items():
        *outer, last = name.split(".")
        node = nested
        for k in outer:
            node = node.setdefault(k, {})
        node[last] = value
    return nested


# ------------------------------------------------------------------------------------------------ cache
def model_source(pretrained: str | Path) -> str:
    """How a cache names its model: a local folder's absolute path, or the hub id as given."""
    path = Path(str(pretrained)).expanduser()
    return str(path.resolve()) if path.is_dir() else str(pretrained)


def native_resolution(folder: Path) -> int:
    """A pipeline folder's native image size from its configs alone (UNet sample size x VAE downsampling), so a
    cache can be checked before any weights load."""
    unet = json.loads((folder / "unet" / "config.json").read_text())
    vae = json.loads((folder / "vae" / "config.json").read_text())
    size = unet["sample_size"]
    size = size if isinstance(size, int) else size[0]
    return size * 2 ** (len(vae["block_out_channels"]) - 1)


def read_index(cache: str | Path) -> dict | None:
    """A cache's index, None if the folder has none yet."""
    path = Path(cache) / INDEX
    if not path.is_file():
        return None
    index = json.loads(path.read_text())
    if index.get("format") != FORMAT:
        raise ValueError(f"{path} is not a dmd2lab text-to-image cache index (format {index.get('format')!r}); "
                         "point at a folder that `dmd2lab prepare-t2i` wrote")
    return index


def check_model(index: dict, cache: str | Path, source: str, kind: str, resolution: int | None = None,
                latent_shape: Sequence[int] | None = None):
    """Refuse a cache made with another model, kind or resolution, naming the fix."""
    ours = index["model"]
    mine = {"source": source, "kind": kind, "resolution": resolution,
            "latent_shape": list(latent_shape) if latent_shape is not None else None}
    differ = [k for k, v in mine.items() if v is not None and ours[k] != v]
    if differ:
        raise ValueError(f"cache {cache} was made for {ours['source']} ({ours['kind']}, {ours['resolution']} px, "
                         f"latents {tuple(ours['latent_shape'])}); this run uses {source} ({kind}"
                         f"{f', {resolution} px' if resolution else ''}) — its {', '.join(differ)} differ. Run "
                         f"`dmd2lab prepare-t2i --pretrained {source} --data DATA --out NEW_CACHE` and use NEW_CACHE, "
                         f"or delete {cache} to rebuild it")


def _fingerprint(pairs: Iterable[Pair]) -> str:
    digest = hashlib.sha256()
    for pair in pairs:
        digest.update(f"{pair.key}\t{pair.caption}\n".encode())
    return digest.hexdigest()


def _shard_name(i: int) -> str:
    return f"shard-{i:05d}.safetensors"


def _write_atomic(path: Path, write):
    """Write through a temporary file renamed into place: a killed run leaves the old file or none, never half."""
    tmp = path.with_name(f".{path.name}.tmp")
    write(tmp)
    with open(tmp, "rb") as f:  # on disk before the rename makes it the file
        os.fsync(f.fileno())
    os.replace(tmp, path)


def _save_index(cache: Path, index: dict):
    _write_atomic(cache / INDEX, lambda tmp: tmp.write_text(json.dumps(index, indent=1)))


def _new_index(pairs: list[Pair], data, source: str, kind: str, resolution: int, shard_size: int) -> dict:
    return {"format": FORMAT, "model": {"source": source, "kind": kind, "resolution": resolution,
                                        "latent_shape": None, "scaling_factor": None},
            "data": {"path": str(Path(data).expanduser().resolve()), "pairs": len(pairs),
                     "fingerprint": _fingerprint(pairs)},
            "shard_size": shard_size, "shards": [], "complete": False}


def _check_resumable(index: dict, cache: Path, pairs: list[Pair], shard_size: int):
    if index["data"]["fingerprint"] != _fingerprint(pairs):
        raise ValueError(f"cache {cache} was made from {index['data']['pairs']} pairs of {index['data']['path']}; the "
                         f"data now lists {len(pairs)} pairs that differ (files or captions changed). Delete {cache} "
                         "to rebuild it, or pass another --out")
    if index["shard_size"] != shard_size:
        raise ValueError(f"cache {cache} has shards of {index['shard_size']} pairs, not {shard_size}; pass "
                         f"--shard-size {index['shard_size']} to resume it, or delete it to rebuild")


def prepare_t2i_cache(pretrained: str | Path, data: str | Path, cache: str | Path, kind: str | None = None,
                      resolution: int | None = None, batch_size: int = 8, device="cpu", shard_size: int = 256,
                      variant: str | None = None, progress: bool = True) -> tuple[Path, int]:
    """Encode every pair under ``data`` once with the teacher's VAE and text encoders into ``cache`` (DMD2's real
    images for the GAN, Sec. 4.3). Resumable: shards already written are skipped (a finished cache loads no model at
    all). Returns (the index path, the number of pairs encoded by this call)."""
    from .t2i_models import folder_kind, require_complete, resolve_folder
    if batch_size < 1 or shard_size < 1:
        raise ValueError(f"batch size and shard size must be >= 1; got {batch_size}, {shard_size}")
    pairs = list_pairs(data)  # data problems first: they need no model
    cache = Path(cache)
    if cache.exists() and not cache.is_dir():
        raise NotADirectoryError(f"--out {cache} is a file; pass a folder for the cache (created if missing)")
    folder = resolve_folder(pretrained, kind, variant)
    kind = folder_kind(folder, kind)
    require_complete(folder, kind, variant)
    resolution = resolution or native_resolution(folder)
    source = model_source(pretrained)
    index = read_index(cache)
    if index is None:
        index = _new_index(pairs, data, source, kind, resolution, shard_size)
    else:
        check_model(index, cache, source, kind, resolution)
        _check_resumable(index, cache, pairs, shard_size)
    todo = [i for i in range(-(-len(pairs) // shard_size))
            if not (i < len(index["shards"]) and (cache / _shard_name(i)).is_file())]
    if todo:
        index["complete"] = False  # a resumed cache that lost a shard is unfinished until it is written again
        _encode_shards(pairs, todo, index, cache, pretrained, kind, resolution, batch_size, device, variant, progress)
    index["complete"] = True
    _save_index(cache, index)
    return cache / INDEX, sum(min(shard_size, len(pairs) - i * shard_size) for i in todo)


def _encode_shards(pairs, todo, index, cache: Path, pretrained, kind, resolution, batch_size, device, variant,
                   progress):
    from tqdm.auto import tqdm
    from safetensors.torch import save_file
    from .t2i import TextConditioner
    from .t2i_models import load_t2i_parts
    # float32 throughout: the VAE must be (SDXL's overflows in float16), and encoding happens once.
    parts = load_t2i_parts(pretrained, kind, variant=variant, device=device)
    conditioner = TextConditioner(parts, (resolution, resolution))  # the size/crop ids of the cropped images
    index["model"].update(latent_shape=[parts.latent_shape[0], resolution // parts.vae_scale_factor,
                                        resolution // parts.vae_scale_factor],
                          scaling_factor=float(parts.vae.config.scaling_factor))
    cache.mkdir(parents=True, exist_ok=True)
    size, reader = index["shard_size"], ImageReader()
    done = len(pairs) - sum(len(pairs[i * size:(i + 1) * size]) for i in todo)
    bar = tqdm(total=len(pairs), initial=done, unit="image", desc="prepare-t2i", disable=not progress)
    try:
        for i in todo:
            shard, tensors = pairs[i * size:(i + 1) * size], []
            for start in range(0, len(shard), batch_size):
                batch = shard[start:start + batch_size]
                images = torch.stack([load_image(reader.read(p), resolution, p.key) for p in batch])
                tensors.append(encode_pairs(parts, conditioner, images, [p.caption for p in batch]))
                bar.update(len(batch))
            merged = {k: torch.cat([t[k] for t in tensors]) for k in tensors[0]}
            # Keys and captions ride in the shard's own header: the index stays small however large the data.
            about = {"keys": json.dumps([p.key for p in shard]), "captions": json.dumps([p.caption for p in shard])}
            _write_atomic(cache / _shard_name(i), lambda tmp: save_file(merged, str(tmp), metadata=about))
            entry = {"file": _shard_name(i), "pairs": len(shard)}
            index["shards"] = index["shards"][:i] + [entry] + index["shards"][i + 1:]
            _save_index(cache, index)  # after the shard: the index never names a shard that is not there
    finally:
        reader.close()
        bar.close()


def finished_index(cache: str | Path) -> dict:
    """The index of a finished cache; an error that says how to make or finish it otherwise."""
    index = read_index(cache)
    if index is None:
        raise FileNotFoundError(f"{cache} holds no text-to-image cache ({INDEX} is missing); make it with "
                                f"`dmd2lab prepare-t2i --pretrained MODEL --data IMAGES --out {cache}`")
    missing = [entry["file"] for entry in index["shards"] if not (Path(cache) / entry["file"]).is_file()]
    if not index["complete"] or missing:
        raise ValueError(f"cache {cache} is unfinished ({len(index['shards'])} shard(s) written"
                         + (f"; missing: {', '.join(missing)}" if missing else "") + "); run the same "
                         "`dmd2lab prepare-t2i` command again to finish it")
    return index


def cache_captions(cache: str | Path) -> list[tuple[str, str]]:
    """(key, caption) of every cached pair, in cache order (read from the shards' headers, no tensors)."""
    from safetensors import safe_open
    rows = []
    for entry in finished_index(cache)["shards"]:
        with safe_open(str(Path(cache) / entry["file"]), "pt") as shard:
            about = shard.metadata()
        rows += list(zip(json.loads(about["keys"]), json.loads(about["captions"])))
    return rows


def load_t2i_cache(cache: str | Path, parts=None, limit: int | None = None) -> tuple[Tensor, dict]:
    """(latents, conditions) of a finished cache, for ``build_t2i_distillation(real_latents=, real_conditions=)``.
    With ``parts``, refuses a cache made for another model, kind or latent size; ``limit`` keeps the first pairs."""
    from safetensors.torch import load_file
    cache = Path(cache)
    index = finished_index(cache)
    if parts is not None:
        check_model(index, cache, model_source(parts.source), parts.kind, latent_shape=parts.latent_shape)
    shards = []
    for entry in index["shards"]:
        shards.append(load_file(str(cache / entry["file"])))
        if limit is not None and sum(s["latents"].shape[0] for s in shards) >= limit:
            break
    flat = {k: torch.cat([s[k] for s in shards])[:limit] for k in shards[0]}
    latents = flat.pop("latents")
    return latents, unflatten(flat)
