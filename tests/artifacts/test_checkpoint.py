"""Checkpoint folders: exact round trips, crash safety, corruption and unsafe-pickle refusal."""

from __future__ import annotations

import json
import os
import random
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from pydantic import BaseModel, ConfigDict
from torch import nn

import mri_vqvae.artifacts.checkpoint as ckpt
from mri_vqvae.artifacts.checkpoint import load_checkpoint, save_checkpoint
from mri_vqvae.artifacts.resume import capture_rng_state, load_resume_state, restore_rng_state
from mri_vqvae.core.errors import CheckpointError
from mri_vqvae.core.provenance import sha256_file
from mri_vqvae.models import registry
from tests.support.paths import REPO


class TinyConfig(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    width: int = 4
    extra_layer: bool = False


class Tiny(nn.Module):
    """Covers the awkward cases: channels_last (non-contiguous) weights, tied weights, a view
    buffer sharing storage, integer and bfloat16 buffers."""

    def __init__(self, cfg: TinyConfig) -> None:
        super().__init__()
        self.conv = nn.Conv3d(2, cfg.width, 3).to(memory_format=torch.channels_last_3d)
        self.a = nn.Linear(cfg.width, cfg.width)
        self.b = nn.Linear(cfg.width, cfg.width)
        self.b.weight = self.a.weight
        base = torch.randn(4, 3)
        self.register_buffer("whole", base)
        self.register_buffer("rows", base[1:3])
        self.register_buffer("count", torch.arange(5))
        self.register_buffer("bf16", torch.randn(3).to(torch.bfloat16))
        if cfg.extra_layer:
            self.c = nn.Linear(cfg.width, 2)


BUILDERS = {"tiny": lambda d: Tiny(TinyConfig.model_validate(d))}


def tiny(seed: int = 0, **kw: object) -> tuple[Tiny, TinyConfig]:
    torch.manual_seed(seed)
    cfg = TinyConfig(**kw)
    return Tiny(cfg), cfg


def assert_same_state(a: nn.Module, b: nn.Module) -> None:
    sa, sb = a.state_dict(), b.state_dict()
    assert list(sa) == list(sb)
    for key in sa:
        assert sa[key].dtype == sb[key].dtype, key
        assert sa[key].shape == sb[key].shape, key
        assert torch.equal(sa[key], sb[key]), key


def test_round_trip_is_bit_identical(tmp_path: Path) -> None:
    model, cfg = tiny(1)
    assert not model.conv.weight.is_contiguous()
    extra = {"psnr": np.float32(31.5), "loss": torch.tensor(float("nan"))}
    folder = save_checkpoint(tmp_path / "ck" / "last", model, "tiny", cfg, extra=extra, step=7)
    assert sorted(p.name for p in folder.iterdir()) == ["COMPLETE", "config.json",
                                                          "model.safetensors"]
    assert [p.name for p in folder.parent.iterdir()] == ["last"]  # no temp folders left
    torch.manual_seed(99)  # a different init: equality must come from the file
    loaded = load_checkpoint(folder, builders=BUILDERS)
    assert_same_state(model, loaded.model)
    assert loaded.model.b.weight is loaded.model.a.weight  # ties survive: built by the model
    assert TinyConfig.model_validate(loaded.config) == cfg
    assert (loaded.kind, loaded.step, loaded.state_path) == ("tiny", 7, None)
    assert loaded.extra == {"psnr": 31.5, "loss": None}
    assert not loaded.model.training
    meta = json.loads((folder / "config.json").read_text())
    assert meta["files"]["model.safetensors"] == sha256_file(folder / "model.safetensors")
    assert meta["versions"]["torch"] and meta["config"] == cfg.model_dump(mode="json")


def test_real_models_round_trip(tmp_path: Path) -> None:
    pytest.importorskip("mri_vqvae.models.autoencoders.vqvae.model")
    pytest.importorskip("mri_vqvae.models.priors.pixelcnn.model")
    from mri_vqvae.models.autoencoders.vqvae.config import VQVAEConfig
    from mri_vqvae.models.autoencoders.vqvae.model import VQVAE
    from mri_vqvae.models.priors.pixelcnn.config import PixelCNNConfig
    from mri_vqvae.models.priors.pixelcnn.model import GatedPixelCNN3D

    vcfg = VQVAEConfig(levels=2, channels=(8, 8), num_res_channels=(8, 8), codebook_size=16,
                       embedding_dim=4)
    pcfg = PixelCNNConfig(codebook_size=16, embedding_dim=4, hidden_channels=8, num_layers=2,
                       head_channels=8)
    for kind, model, cfg in [("vqvae", VQVAE(vcfg), vcfg), ("prior", GatedPixelCNN3D(pcfg), pcfg)]:
        loaded = load_checkpoint(save_checkpoint(tmp_path / kind, model, kind, cfg))
        assert_same_state(model, loaded.model)
        assert type(loaded.model) is type(model)


def _partial_write(tensors: dict, filename: str, metadata: dict | None = None) -> None:
    Path(filename).write_bytes(b"\x00" * 100)
    raise OSError(28, "No space left on device")


def test_failed_save_keeps_previous(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    model, cfg = tiny(1)
    folder = save_checkpoint(tmp_path / "last", model, "tiny", cfg, step=1)
    monkeypatch.setattr(ckpt.safetensors.torch, "save_file", _partial_write)
    with pytest.raises(OSError, match="No space"):
        save_checkpoint(folder, tiny(2)[0], "tiny", cfg, step=2)
    monkeypatch.undo()
    assert [p.name for p in tmp_path.iterdir()] == ["last"]
    loaded = load_checkpoint(folder, builders=BUILDERS)
    assert loaded.step == 1
    assert_same_state(model, loaded.model)


def test_kill_between_renames_keeps_previous(tmp_path: Path) -> None:
    """The state a kill between the two renames of the swap leaves behind."""
    first, cfg = tiny(1)
    last = save_checkpoint(tmp_path / "last", first, "tiny", cfg, step=1)
    newer = save_checkpoint(tmp_path / "scratch", tiny(2)[0], "tiny", cfg, step=2)
    os.replace(last, tmp_path / ".last.old-1234abcd")
    os.replace(newer, tmp_path / ".last.tmp-xyz")
    assert load_checkpoint(last, builders=BUILDERS).step == 1  # read-only: sees the old one
    save_checkpoint(last, tiny(3)[0], "tiny", cfg, step=3)  # repairs, then swaps
    assert sorted(p.name for p in tmp_path.iterdir()) == ["last"]
    assert load_checkpoint(last, builders=BUILDERS).step == 3


KILL_SCRIPT = """
import sys, torch
from torch import nn
from mri_vqvae.artifacts.checkpoint import save_checkpoint
model = nn.Sequential(nn.Linear(512, 512), nn.Linear(512, 512))  # ~2 MB per save
for step in range(1, 100000):
    with torch.no_grad():
        for p in model.parameters():
            p.fill_(step)
    save_checkpoint(sys.argv[1], model, "seq", {"n": 2}, state={"step": step, "m": torch.ones(3)})
    print(step, flush=True)
"""


def _seq(d: dict) -> nn.Module:
    return nn.Sequential(*[nn.Linear(512, 512) for _ in range(d["n"])])


@pytest.mark.skipif(not hasattr(signal, "SIGKILL"), reason="needs POSIX signals")
def test_sigkill_during_saves_leaves_a_loadable_checkpoint(tmp_path: Path) -> None:
    folder = tmp_path / "checkpoints" / "last"
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    proc = subprocess.Popen([sys.executable, "-c", KILL_SCRIPT, str(folder)], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        assert proc.stdout is not None
        first = proc.stdout.readline()
        assert first.strip() == "1", proc.stderr.read() if proc.stderr else ""
        time.sleep(0.4 + random.random() * 0.3)  # land somewhere inside a later save
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    loaded = load_checkpoint(folder, builders={"seq": _seq})
    assert loaded.step is not None and loaded.step >= 1
    for p in loaded.model.parameters():
        assert torch.all(p == loaded.step)
    assert load_resume_state(folder)["step"] == loaded.step
    save_checkpoint(folder, loaded.model, "seq", {"n": 2}, step=loaded.step + 1)
    assert sorted(p.name for p in folder.parent.iterdir()) == ["last"]


def test_corrupted_weights_named(tmp_path: Path) -> None:
    model, cfg = tiny()
    folder = save_checkpoint(tmp_path / "last", model, "tiny", cfg)
    path = folder / "model.safetensors"
    data = bytearray(path.read_bytes())
    data[-5] ^= 0x01
    path.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match=r"model\.safetensors is corrupted"):
        load_checkpoint(folder, builders=BUILDERS)


def test_missing_and_unexpected_keys(tmp_path: Path) -> None:
    model, cfg = tiny()
    folder = save_checkpoint(tmp_path / "last", model, "tiny", cfg)
    bigger = {"tiny": lambda d: Tiny(TinyConfig(width=d["width"], extra_layer=True))}
    with pytest.raises(CheckpointError, match=r"missing keys \['c\.bias', 'c\.weight'\]"):
        load_checkpoint(folder, builders=bigger)
    smaller = {"tiny": lambda d: nn.Linear(4, 4)}
    with pytest.raises(CheckpointError, match=r"unexpected keys \[.*'conv\.weight'"):
        load_checkpoint(folder, builders=smaller)
    wider = {"tiny": lambda d: Tiny(TinyConfig(width=6))}
    with pytest.raises(CheckpointError, match="does not fit the model"):
        load_checkpoint(folder, builders=wider)
    known = re.escape(str(sorted(registry.KINDS)))  # every registered kind, named
    with pytest.raises(CheckpointError, match=r"unknown model kind 'tiny'.*" + known):
        load_checkpoint(folder)


def test_incomplete_or_missing_folder_refused(tmp_path: Path) -> None:
    model, cfg = tiny()
    save_checkpoint(tmp_path / "best", model, "tiny", cfg)
    folder = save_checkpoint(tmp_path / "last", model, "tiny", cfg)
    (folder / "COMPLETE").unlink()
    with pytest.raises(CheckpointError, match=r"incomplete.*checkpoints/best.*best"):
        load_checkpoint(folder, builders=BUILDERS)
    with pytest.raises(CheckpointError, match="does not exist"):
        load_checkpoint(tmp_path / "nope", builders=BUILDERS)
    (folder / "COMPLETE").write_text("x")
    (folder / "config.json").unlink()
    with pytest.raises(CheckpointError, match=r"config\.json is missing"):
        load_checkpoint(folder, builders=BUILDERS)


def test_refuses_to_replace_a_non_checkpoint_folder(tmp_path: Path) -> None:
    (tmp_path / "run.json").write_text("{}")
    (tmp_path / "hidden" / ".git").mkdir(parents=True)
    model, cfg = tiny()
    for folder in (tmp_path, tmp_path / "hidden"):
        with pytest.raises(CheckpointError, match="not a checkpoint folder"):
            save_checkpoint(folder, model, "tiny", cfg)
    assert (tmp_path / "run.json").read_text() == "{}" and (tmp_path / "hidden" / ".git").is_dir()


class Payload:
    """Unpickling this creates `marker`: what a hostile state.pt could do."""

    def __init__(self, marker: Path) -> None:
        self.marker = str(marker)

    def __reduce__(self) -> tuple:
        return (open, (self.marker, "w"))


def test_pickle_payload_refused_and_never_runs(tmp_path: Path) -> None:
    proof, marker = tmp_path / "proof", tmp_path / "pwned"
    torch.save({"step": 1, "x": Payload(proof)}, tmp_path / "proof.pt")
    torch.load(tmp_path / "proof.pt", weights_only=False)  # the payload is real...
    assert proof.exists()

    evil = tmp_path / "evil.pt"
    torch.save({"step": 1, "x": Payload(marker)}, evil)
    with pytest.raises(CheckpointError, match="refused"):
        load_resume_state(evil)
    # ... and inside a checkpoint whose config.json an attacker updated to match
    model, cfg = tiny()
    folder = save_checkpoint(tmp_path / "last", model, "tiny", cfg, state={"step": 1})
    (folder / "state.pt").write_bytes(evil.read_bytes())
    with pytest.raises(CheckpointError, match=r"state\.pt is corrupted"):
        load_resume_state(folder)
    meta = json.loads((folder / "config.json").read_text())
    meta["files"]["state.pt"] = sha256_file(folder / "state.pt")
    (folder / "config.json").write_text(json.dumps(meta))
    with pytest.raises(CheckpointError, match="refused"):
        load_resume_state(folder)
    assert not marker.exists()


def test_state_must_be_plain(tmp_path: Path) -> None:
    model, cfg = tiny()
    with pytest.raises(CheckpointError, match=r"state\['best'\] is a numpy\.ndarray"):
        save_checkpoint(tmp_path / "last", model, "tiny", cfg, state={"best": np.zeros(2)})
    assert not (tmp_path / "last").exists()


def _draws() -> tuple:
    return (torch.rand(5), np.random.rand(5), np.random.randn(3), random.random(),
            random.gauss(0, 1))


def _same(a: tuple, b: tuple) -> bool:
    return (torch.equal(a[0], b[0]) and np.array_equal(a[1], b[1]) and np.array_equal(a[2], b[2])
            and a[3:] == b[3:])


def test_rng_round_trip() -> None:
    torch.manual_seed(3), np.random.seed(3), random.seed(3)
    np.random.randn(1), random.gauss(0, 1)  # leave cached gaussians in both generators
    state = capture_rng_state()
    before = _draws()
    _draws()
    restore_rng_state(state)
    assert _same(before, _draws())


def test_resume_state_round_trip(tmp_path: Path) -> None:
    model, cfg = tiny()
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    loss = model.a(torch.randn(2, 4)).sum()
    loss.backward()
    opt.step()
    state = {"optimizer": opt.state_dict(), "step": 10, "best_metric": 0.5,
             "rng": capture_rng_state()}
    before = _draws()
    folder = save_checkpoint(tmp_path / "last", model, "tiny", cfg, state=state)
    loaded = load_checkpoint(folder, builders=BUILDERS)
    assert loaded.step == 10 and loaded.state_path == folder / "state.pt"
    resumed = load_resume_state(folder)
    assert (resumed["step"], resumed["best_metric"]) == (10, 0.5)
    opt2 = torch.optim.Adam(loaded.model.parameters(), lr=1e-3)
    opt2.load_state_dict(resumed["optimizer"])
    sa, sb = opt.state_dict()["state"], opt2.state_dict()["state"]
    assert sa.keys() == sb.keys()
    assert all(torch.equal(sa[i][k], sb[i][k]) for i in sa for k in sa[i])
    restore_rng_state(resumed["rng"])
    assert _same(before, _draws())
