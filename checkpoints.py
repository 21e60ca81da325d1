"""Checkpoint files: read without running code from them (`read_checkpoint`); the weights found in any wrapper and
mapped from DeiT's or timm's image layout, train.py's or the authors' release's (`load_pretrained`); train.py's run
checkpoint, written whole or not at all, with every RNG's state (`save_checkpoint`, `load_checkpoint`)."""
import argparse
import json
import logging
import math
import os
import pickle
import random
import re
from pathlib import Path
from typing import Optional

import torch

from haltingvt import HaltingVT, HaltingVTConfig, resize_pos_embed, resize_time_embed

# ----------------------------------------------------------------------------------------------------------
# Reading files without running code from them

SAFE_GLOBALS = [argparse.Namespace]  # DeiT's and timm's training scripts save their args; nothing else is unpickled
SAFETENSORS_DTYPES = dict(F64=torch.float64, F32=torch.float32, F16=torch.float16, BF16=torch.bfloat16, I64=torch.int64,
                          I32=torch.int32, I16=torch.int16, I8=torch.int8, U8=torch.uint8, BOOL=torch.bool)


def read_checkpoint(path) -> dict:
    """A checkpoint file's contents, read without running code from it: a `.safetensors` file parsed, anything else
    through torch.load(weights_only=True) (tensors, plain values, SAFE_GLOBALS). Raises ValueError naming the file
    and the object refused, or saying it is no checkpoint (a text file, a zip archive); FileNotFoundError."""
    path = Path(path)
    if path.suffix == ".safetensors":
        return read_safetensors(path)
    with open(path, "rb") as f:
        magic = f.read(4)
    if not magic.startswith((b"PK\x03\x04", b"\x80")):  # torch.save writes a zip archive (or, before 1.6, a pickle)
        raise ValueError(f"{path}: not a checkpoint (it starts with {magic!r}); expected a file written by "
                         "torch.save (.pt, .pth, .bin) or a .safetensors file")
    try:
        with torch.serialization.safe_globals(SAFE_GLOBALS):
            return torch.load(path, map_location="cpu", weights_only=True)
    except RuntimeError as err:  # a zip archive that torch.save did not write
        raise ValueError(f"{path}: a zip archive but not a checkpoint torch.save wrote "
                         f"({str(err).splitlines()[0]})") from None
    except pickle.UnpicklingError as err:
        what = re.search(r"GLOBAL (\S+)", str(err))
        raise ValueError(f"{path}: refused to unpickle {what.group(1) if what else 'an object'}: only tensors, "
                         "plain values and argparse.Namespace are read, since unpickling anything else can run "
                         "code. If you trust the file, load it yourself and torch.save its state dict alone") from None


def read_safetensors(path) -> dict:
    """A .safetensors file (timm's hub weights) as a state dict: an 8-byte little-endian header size, a JSON header
    giving each tensor's dtype, shape and byte range, then the bytes (read without the safetensors package)."""
    raw = bytearray(Path(path).read_bytes())
    n = int.from_bytes(raw[:8], "little")
    header, body = json.loads(raw[8:8 + n]), memoryview(raw)[8 + n:]
    header.pop("__metadata__", None)
    state = {}
    for name, info in header.items():
        if info["dtype"] not in SAFETENSORS_DTYPES:
            raise ValueError(f"{path}: tensor {name} has dtype {info['dtype']}, not one of {list(SAFETENSORS_DTYPES)}")
        (start, end), dtype = info["data_offsets"], SAFETENSORS_DTYPES[info["dtype"]]
        flat = torch.frombuffer(body[start:end], dtype=dtype) if end > start else torch.empty(0, dtype=dtype)
        state[name] = flat.reshape(info["shape"])
    return state


# ----------------------------------------------------------------------------------------------------------
# The weights in any wrapper, foreign layouts mapped: DeiT/timm image, train.py video, the release's

WEIGHT_KEYS = ("model", "state_dict", "module", "model_ema", "state_dict_ema")  # wrappers; raw weights before EMA
ANCHOR = "patch_embed.proj.weight"  # in every layout; what precedes it ("module.", "backbone.model.") is a prefix
RELEASE_HEADS = {"cls_head.fc_cls.": "head.", "cls_head.fc_motion.": "motion_head."}  # the release's mmaction2 heads
HEADS = ("head.", "motion_head.")  # task heads: another task's checkpoint may lack them or count other classes


def find_state_dict(ckpt) -> tuple:
    """(state dict, where found): the first WEIGHT_KEYS wrapper, else the top level, with a tensor *ANCHOR (wrappers
    first: a file may hold scalars, as `best_acc1`, beside `state_dict`); else the first wrapper or a top level with
    tensors, for the error to describe; else (None, None)."""
    if not isinstance(ckpt, dict):
        return None, None
    places = [(ckpt[k], f'"{k}"') for k in WEIGHT_KEYS if isinstance(ckpt.get(k), dict)] + [(ckpt, "the top level")]
    for state, where in places:
        if any(str(k).endswith(ANCHOR) and isinstance(v, torch.Tensor) for k, v in state.items()):
            return state, where
    return places[0] if len(places) > 1 or any(isinstance(v, torch.Tensor) for v in ckpt.values()) else (None, None)


def strip_prefix(state: dict) -> Optional[dict]:
    """The tensors of `state` under the model's names: the prefix before ANCHOR (`module.` of DDP, `model.`,
    the release's `backbone.model.`, ...) removed, the release's head names replaced. None without ANCHOR."""
    anchors = [k for k in state if k.endswith(ANCHOR)]
    if not anchors:
        return None
    prefix, out = min(anchors, key=len)[:-len(ANCHOR)], {}
    for key, value in state.items():
        key = key[len(prefix):] if key.startswith(prefix) else key
        for old, new in RELEASE_HEADS.items():
            key = new + key.split(old, 1)[1] if old in key else key
        if isinstance(value, torch.Tensor):
            out[key] = value
    return out


def checkpoint_file_layout(ckpt) -> Optional[str]:
    """The layout of a checkpoint file's contents, by its names: "video" (train.py's own), "release" (flat
    `blocks.i` with temporal layers) or "image" (DeiT/timm); None where no ViT weights are found."""
    keys = strip_prefix(find_state_dict(ckpt)[0] or {})
    if keys is None:
        return None
    if any(k.startswith(("glimpser.blocks.", "joint.blocks.")) for k in keys):
        return "video"
    return "release" if any(k.startswith("blocks.") and ".temporal_" in k for k in keys) else "image"


def model_keys(key: str, layout: str, g: int) -> list:
    """The model's names for one file key. Flat `blocks.i` (image, release): the first g layers are the Glimpser's,
    the rest joint.blocks.(i-g); an image layer also lends attn and norm1 to the Glimpser's temporal ones."""
    if layout == "video" or not key.startswith("blocks."):
        return [key]
    _, i, rest = key.split(".", 2)
    if int(i) >= g:
        return [f"joint.blocks.{int(i) - g}.{rest}"]
    temporal = layout == "image" and rest.startswith(("attn.", "norm1."))
    return [f"glimpser.blocks.{i}.{rest}"] + ([f"glimpser.blocks.{i}.temporal_{rest}"] if temporal else [])


def adapt_pos_embed(pos: torch.Tensor, grid: tuple) -> torch.Tensor:
    """A file's (1, p + S0, D) position embedding -> the model's (1, 1 + gh*gw, D). p entries before the square
    grid: 1, the class token's; 2, a distilled DeiT's class and distillation tokens' (the second dropped); 0."""
    n = pos.shape[1]
    p = next((p for p in (1, 2, 0) if n > p and math.isqrt(n - p) ** 2 == n - p), None)
    if p is None:
        raise ValueError(f"pos_embed has {n} entries: not a square patch grid after 0, 1 or 2 token entries")
    cls = pos[:, :1] if p else pos.new_zeros(1, 1, pos.shape[2])
    return resize_pos_embed(torch.cat([cls, pos[:, p:]], 1), grid)


def map_checkpoint(model: HaltingVT, keys: dict, layout: str) -> tuple:
    """(model name -> tensor, file keys not used, notes): names mapped, embeddings resized, a head of another
    class count dropped (left fresh). Raises ValueError for any other shape that differs."""
    cfg, target, mapped, unused, notes = model.cfg, model.state_dict(), {}, [], []
    for key, value in keys.items():
        names = [n for n in model_keys(key, layout, cfg.glimpser_depth) if n in target]
        mapped.update((n, value) for n in names)
        if not names:
            unused.append(key)
    if "pos_embed" in mapped:
        mapped["pos_embed"] = adapt_pos_embed(mapped["pos_embed"], (cfg.img_size // cfg.patch_size,) * 2)
    if "time_embed" in mapped and layout != "image":
        mapped["time_embed"] = resize_time_embed(mapped["time_embed"], cfg.num_frames)
    for head in HEADS:
        w = head + "weight"
        if w in mapped and mapped[w].shape != target[w].shape:
            notes.append(f"{head[:-1]}: {mapped[w].shape[0]} outputs in the file, {target[w].shape[0]} in the "
                         "model: left fresh")
            mapped.pop(w), mapped.pop(head + "bias", None)
    if "dist_token" in unused:
        notes.append("dist_token: a distilled DeiT's, unused, so the class token's features differ a little")
    for name, value in mapped.items():
        if value.shape != target[name].shape:
            raise ValueError(f"checkpoint tensor for {name} has shape {tuple(value.shape)}, the model expects "
                             f"{tuple(target[name].shape)}")
    return mapped, unused, notes


def check_coverage(model: HaltingVT, mapped: dict, unused: list, layout: str, describe: str):
    """ValueError unless every backbone tensor (not the heads; for an image checkpoint, not time_embed and
    temporal_fc, which start at zero) was found and no file tensor of a model layer went unused (layer scale, a
    temporal part where the model has a joint layer: the layer would compute something else)."""
    target = model.state_dict()
    fresh = lambda k: k.startswith(HEADS) or layout == "image" and (k == "time_embed" or ".temporal_fc." in k)
    missing = [k for k in target if k not in mapped and not fresh(k)]
    layers = {".".join(k.split(".")[:3]) for k in target if k.startswith(("glimpser.blocks.", "joint.blocks."))}
    misfits = [k for k in unused for n in model_keys(k, layout, model.cfg.glimpser_depth)
               if ".".join(n.split(".")[:3]) in layers]
    if missing:
        raise ValueError(f"the checkpoint lacks {len(missing)} of the model's backbone tensors, e.g. {missing[:4]}; "
                         f"{describe}. Expected a DeiT/ViT image checkpoint with timm's names (cls_token, pos_embed, "
                         f"{ANCHOR}, blocks.0.attn.qkv.weight, ..., norm.weight; any prefix), the authors' release "
                         "(backbone.model.*, cls_head.*) or a train.py checkpoint, of the model's depth and width")
    if misfits:
        raise ValueError(f"the checkpoint's layers hold tensors this model has no place for, e.g. {misfits[:4]}; "
                         f"{describe}")


def load_pretrained(model: HaltingVT, ckpt) -> dict:
    """Load the weights of `ckpt`, a file's contents (read_checkpoint: a state dict, raw or in a WEIGHT_KEYS
    wrapper, any prefix), into the video model, by the layout its names show:
      - image (DeiT's, timm's): the Glimpser's temporal attention and norm copy the spatial ones, `temporal_fc`
        and the time embedding start at zero (the video model starts as the image model); `pos_embed` resized;
      - video (train.py's): as it is, the embeddings resized to the model's frames and size;
      - release (mmaction2's `backbone.model.blocks.i`, `cls_head.fc_cls`, `cls_head.fc_motion`; its motion token
        unused): it computes as trained with `release_compat` and its config's gamma, beta and R.
    A head of another class count is left fresh. ValueError, naming what the file holds and what was expected,
    for a missing backbone tensor, a differing shape or a layer tensor the model has no place for. Returns (and
    logs) {"layout", "weights" (where), "loaded", "share" (of parameters), "missing", "unused", "notes"}."""
    state, where = find_state_dict(ckpt)
    keys, layout = strip_prefix(state or {}), checkpoint_file_layout(ckpt)
    top = list(ckpt)[:10] if isinstance(ckpt, dict) else type(ckpt).__name__
    names = [k for k, v in (state or {}).items() if isinstance(v, torch.Tensor)][:5]
    describe = f"the file's top-level keys: {top}; tensors such as {names}"
    if keys is None:
        raise ValueError(f"no ViT weights found (no tensor named *{ANCHOR}): {describe}. Expected a state dict, "
                         f"raw or under one of {list(WEIGHT_KEYS)}")
    mapped, unused, notes = map_checkpoint(model, keys, layout)
    check_coverage(model, mapped, unused, layout, describe)
    model.load_state_dict(mapped, strict=False)
    target = model.state_dict()  # the parameters' tensors, detached
    for name in target if layout == "image" else []:  # the video parts start at zero: the image model, per frame
        if name == "time_embed" or ".temporal_fc." in name:
            target[name].zero_()
    share = sum(target[k].numel() for k in mapped) / sum(t.numel() for t in target.values())
    report = dict(layout=layout, weights=where, loaded=len(mapped), share=share,
                  missing=[k for k in target if k not in mapped], unused=unused, notes=notes)
    # the share rounded down: a fresh head of a few hundred parameters must not read as 100.0%
    logging.getLogger(__name__).info(
        "loaded %d of %d tensors (%.1f%% of the parameters) from a checkpoint of layout %s (weights under %s)%s; left "
        "as initialised: %s; not used: %s", len(mapped), len(target), math.floor(1000 * share) / 10, layout, where,
        "".join(f"; {n}" for n in notes), report["missing"] or "none", unused or "none")
    return report


# ----------------------------------------------------------------------------------------------------------
# The run checkpoint: plain values that torch.load(weights_only=True) reads, written whole or not at all

def rng_states() -> dict:
    """Python's and torch's RNG states in a form weights_only=True loads (Python's state tuple as lists). Not
    numpy's global RNG: nothing in training draws from it (data.py draws from a random.Random per video, and the
    demo set from its own numpy generators), so a resumed run takes the same samples without it."""
    version, internal, gauss = random.getstate()
    cuda = {"cuda": torch.cuda.get_rng_state_all()} if torch.cuda.is_available() else {}
    return {"python": [version, list(internal), gauss], "torch": torch.get_rng_state(), **cuda}


def set_rng_states(states: dict):
    """Put back the states rng_states saved (a "numpy" entry, from an older checkpoint, is left aside)."""
    version, internal, gauss = states["python"]
    random.setstate((version, tuple(internal), gauss))
    torch.set_rng_state(states["torch"])
    if "cuda" in states and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(states["cuda"])


def plain(value):
    """A value (a run's arguments, say) as one that weights_only=True loads: tuples become lists, paths strings."""
    if isinstance(value, dict):
        return {k: plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [plain(v) for v in value]
    return value if value is None or isinstance(value, (bool, int, float, str)) else str(value)


def write_checkpoint(path, ckpt: dict):
    """torch.save to a temporary file, then a rename: a kill at any moment leaves the old file whole."""
    tmp = f"{path}.tmp"
    torch.save(ckpt, tmp)
    os.replace(tmp, path)


def save_checkpoint(path, model, optimizer, state: dict, cfg: HaltingVTConfig, args, classes=None):
    """The run as a plain dict (tensors, numbers, strings, lists: it loads with weights_only=True), written whole
    or not at all (write_checkpoint). `state`: train.py's PROGRESS values and "world"; `classes`: names, or None."""
    ckpt = {"model": model.state_dict(), "optimizer": optimizer.state_dict(), **state, "config": cfg.to_dict(),
            "args": plain(vars(args)), "classes": classes, "rng": rng_states()}
    write_checkpoint(path, ckpt)


def read_run_checkpoint(path) -> dict:
    """A checkpoint written by train.py, read with weights_only=True; ValueError naming the file for any other."""
    ckpt = read_checkpoint(path)
    if not (isinstance(ckpt, dict) and {"model", "config"} <= ckpt.keys()):
        raise ValueError(f"{path}: not written by train.py (it has no 'model' and 'config'); to start "
                         "from other weights, pass it to --init")
    return ckpt


def load_checkpoint(path, model, optimizer=None) -> dict:
    """Load weights, and with an optimiser its state and the RNG states; returns the checkpoint (PROGRESS: where it
    stood)."""
    ckpt = read_run_checkpoint(path)
    model.load_state_dict(ckpt["model"])
    if optimizer is not None:
        optimizer.load_state_dict(ckpt["optimizer"])
        set_rng_states(ckpt["rng"])
    return ckpt


if __name__ == "__main__":  # a DDP-saved model's weights written to a file, read back and loaded into a fresh model
    import tempfile
    cfg = HaltingVTConfig.tiny()
    with tempfile.TemporaryDirectory() as tmp:
        write_checkpoint(f"{tmp}/ddp.pt", {"model": {f"module.{k}": v for k, v in HaltingVT(cfg).state_dict().items()}})
        report = load_pretrained(HaltingVT(cfg), read_checkpoint(f"{tmp}/ddp.pt"))
    print({k: report[k] for k in ("layout", "weights", "loaded", "share")})
