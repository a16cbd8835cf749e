"""Multi-process (DDP) training and batch encode: 2 CPU processes over gloo.

Unit tests check the pure pieces (sharding, the per-rank batch keys, the world-size checks, the
helpers outside a process group); a 2-process `torch.multiprocessing` run checks that the EMA
codebook follows the whole batch; `torchrun` subprocesses run the real entry points on tiny
synthetic heads. The `DUMP_ENV` test hook makes every rank save its final state_dict.

Tolerance against one process with the same global batch: every tensor within 1e-5 (seen:
~2e-7). Not bit-identical because the sums are taken in another order: each rank's loss is a
mean over its share, DDP averages the ranks' gradients, and the quantizer all-reduces per-rank
code sums, where one process sums the whole batch at once. The two ranks of one DDP run, and a
DDP run resumed after a kill, are bit-identical.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch

from mri_vqvae.core import distributed
from mri_vqvae.training.batching import (
    batch_keys,
    check_world_size,
    global_batch_size,
    rank_keys,
    steps_per_epoch,
)
from mri_vqvae.training.errors import TrainingError
from mri_vqvae.training.loop import DUMP_ENV, KILL_ENV
from tests.support.paths import REPO

TOLERANCE = 1e-5  # max abs difference DDP vs one process (see the module docstring)


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in (DUMP_ENV, KILL_ENV)}
    return {**env, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO), **extra}


def _torchrun(args: list[str], timeout: int = 120, **env: str) -> subprocess.CompletedProcess:
    """``torchrun --nproc_per_node=2`` on a free local port, from the repository root."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nnodes=1", "--nproc_per_node=2",
           "--master_addr=127.0.0.1", f"--master_port={_free_port()}", *args]
    return subprocess.run(cmd, cwd=REPO, env=_env(**env), capture_output=True, text=True,
                          timeout=timeout, check=False)


def _dump(folder: Path, rank: int) -> dict[str, Any]:
    return torch.load(folder / f"rank{rank}.pt", weights_only=True)


def _max_diff(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    assert a.keys() == b.keys()
    return max((a[k].double() - b[k].double()).abs().max().item() for k in a)


def _assert_equal_states(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert a.keys() == b.keys()
    different = [k for k in a if not torch.equal(a[k], b[k])]
    assert not different, f"ranks differ in {different}"


# --- pure pieces ---------------------------------------------------------------------------------


@pytest.mark.parametrize("n, parts", [(7, 2), (2, 3), (12, 4), (0, 2)])
def test_shards_partition_the_items_in_order(n: int, parts: int) -> None:
    items = list(range(n))
    shares = [distributed.shard(items, part, parts) for part in range(parts)]
    assert [i for share in shares for i in share] == items  # each item exactly once, in order
    assert max(map(len, shares)) - min(map(len, shares)) <= 1


@pytest.mark.parametrize("n, batch_size, world", [(7, 4, 2), (8, 4, 4), (5, 6, 2)])
def test_rank_shares_make_up_the_single_process_batch(n: int, batch_size: int, world: int) -> None:
    for step in range(3 * steps_per_epoch(n, batch_size)):
        whole = batch_keys(step, n, batch_size, seed=3)
        shares = [rank_keys(step, n, batch_size, 3, r, world) for r in range(world)]
        assert [k for share in shares for k in share] == whole
        assert len(whole) == global_batch_size(step, n, batch_size)


def test_world_size_checks_name_the_fix() -> None:
    check_world_size(7, 4, 2, "train_vqvae")  # last batch of 3: shares of 2 and 1
    check_world_size(3, 3, 1, "train_vqvae")  # one process: anything goes
    with pytest.raises(TrainingError, match=r"batch_size=3 .*divisible.*batch_size=2 or 4"):
        check_world_size(8, 3, 2, "train_vqvae")
    with pytest.raises(TrainingError, match="last batch of 1 per epoch, fewer than the 2"):
        check_world_size(5, 4, 2, "train_prior")


def test_helpers_outside_a_process_group(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    assert (distributed.rank(), distributed.world_size(), distributed.is_main()) == (0, 1, True)
    assert distributed.all_gather_object({"a": 1}) == [{"a": 1}]
    assert distributed.broadcast_object("x") == "x"
    distributed.barrier()
    assert distributed.shard([1, 2, 3]) == [1, 2, 3]
    assert distributed.init("cpu") is False and distributed.local_device("cpu").type == "cpu"
    monkeypatch.setenv("WORLD_SIZE", "2")
    for name in ("RANK", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        monkeypatch.delenv(name, raising=False)
    with pytest.raises(distributed.DistributedError, match="torchrun"):
        distributed.init("cpu")


# --- the EMA codebook under 2 processes ----------------------------------------------------------

_SHARES = (3, 2)  # a 5-item batch shared unevenly, like the last batch of an epoch


def _quantizer_batches() -> torch.Tensor:
    """(steps, 5, D=4, 2, 2, 2): the data drifts, so codes die and get revived at step 4."""
    gen = torch.Generator().manual_seed(1)
    z = torch.randn(4, sum(_SHARES), 4, 2, 2, 2, generator=gen)
    return z + torch.arange(4).view(4, 1, 1, 1, 1, 1) * 3.0


def _run_quantizer(batches: torch.Tensor, start: int, stop: int) -> dict[str, Any]:
    from mri_vqvae.models.autoencoders.vqvae.quantizer import EMAQuantizer

    torch.manual_seed(0)
    q = EMAQuantizer(16, 4, dead_code_threshold=0.5, revival_interval=4, kmeans_iters=3).train()
    usage = [float(v) for z in batches for v in q(z[start:stop])[3:]]  # perplexity, codes
    return {"state": q.state_dict(), "usage": usage, "rng": torch.get_rng_state()}


def _quantizer_worker(rank: int, world: int, port: int, out: str) -> None:
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank,
                            world_size=world)
    try:
        start, stop = distributed.shard_bounds(sum(_SHARES), rank, world)
        assert stop - start == _SHARES[rank]
        torch.save(_run_quantizer(_quantizer_batches(), start, stop), Path(out) / f"q{rank}.pt")
    finally:
        dist.destroy_process_group()


def test_ema_codebook_follows_the_whole_batch_across_ranks(tmp_path: Path) -> None:
    torch.multiprocessing.spawn(_quantizer_worker, args=(2, _free_port(), str(tmp_path)),
                                nprocs=2, join=True)
    r0, r1 = (torch.load(tmp_path / f"q{r}.pt", weights_only=True) for r in (0, 1))
    _assert_equal_states(r0["state"], r1["state"])
    assert torch.equal(r0["rng"], r1["rng"])  # the same draws on every rank
    batches = _quantizer_batches()
    single = _run_quantizer(batches, 0, sum(_SHARES))
    assert _max_diff(r0["state"], single["state"]) < TOLERANCE
    assert r0["usage"] == pytest.approx(single["usage"], rel=1e-6)  # whole-batch perplexity
    assert int(r0["state"]["steps"]) == 4
    # step 4 revived dead codes with vectors of the gathered batch (both ranks' rows)
    last = batches[-1].movedim(1, -1).reshape(-1, 4)
    revived = (r0["state"]["codebook"][:, None] == last[None]).all(-1).any(-1)
    assert revived.any()


# --- torchrun: train-vqvae -----------------------------------------------------------------------

VQVAE_SETS = ["train_vqvae.batch_size=4", "train_vqvae.max_steps=4", "train_vqvae.val_every=3",
              "train_vqvae.checkpoint_every=2", "train_vqvae.preview_every=3"]


def _sets(overrides: list[str]) -> list[str]:
    return [arg for o in overrides for arg in ("--set", o)]


@pytest.fixture(scope="module")
def manifest(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """7 train heads (batches of 4: the epoch's last batch of 3 splits 2 + 1) and 1 val."""
    from tests.support.runs import write_head_manifest as _write_manifest

    root = tmp_path_factory.mktemp("heads")
    return _write_manifest(root, {**{f"c{i}": "train" for i in range(7)}, "v": "val"})


@pytest.fixture(scope="module")
def ddp_vqvae(manifest: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """A 2-process smoke run; returns its run folder and the folder of the ranks' dumps."""
    runs, dump = tmp_path_factory.mktemp("ddp_runs"), tmp_path_factory.mktemp("ddp_dump")
    proc = _torchrun(["-m", "pipelines.train_vqvae", "--manifest", str(manifest), "--config",
                      "smoke", *_sets(VQVAE_SETS), "--runs-root", str(runs)],
                     **{DUMP_ENV: str(dump)})
    assert proc.returncode == 0, proc.stderr[-3000:]
    (run_dir,) = (runs / "vqvae").iterdir()
    assert proc.stdout.count("run written to") == 1  # rank 0 alone prints
    return run_dir, dump


def test_ddp_ranks_agree_and_match_one_process(
    manifest: Path, ddp_vqvae: tuple[Path, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from mri_vqvae.artifacts.checkpoint import load_checkpoint
    from mri_vqvae.artifacts.resume import load_resume_state
    from mri_vqvae.artifacts.runs import read_metrics
    from mri_vqvae.config import load_config
    from mri_vqvae.training.autoencoder_stage import train_vqvae

    run_dir, dump = ddp_vqvae
    r0, r1 = _dump(dump, 0), _dump(dump, 1)
    assert r0["world"] == 2 and r0["step"] == r1["step"] == 4
    _assert_equal_states(r0["model"], r1["model"])  # weights and EMA codebook buffers
    assert torch.equal(r0["rng"], r1["rng"])
    _assert_equal_states(r0["model"], load_checkpoint(run_dir / "checkpoints" / "last").model
                         .state_dict())
    assert load_resume_state(run_dir / "checkpoints" / "last")["step"] == 4
    assert sorted(p.name for p in (run_dir / "previews").iterdir()) == [
        "step_0000003.png", "step_0000004.png"]
    assert json.loads((run_dir / "run.json").read_text())["status"] == "completed"

    monkeypatch.setenv(DUMP_ENV, str(tmp_path / "dump"))
    single = train_vqvae(load_config("smoke", VQVAE_SETS), manifest, runs_root=tmp_path)
    one = _dump(tmp_path / "dump", 0)
    assert one["world"] == 1
    assert _max_diff(r0["model"], one["model"]) < TOLERANCE
    assert torch.equal(r0["rng"], one["rng"])  # same k-means / revival draws as one process
    ddp_lines, one_lines = read_metrics(run_dir), read_metrics(single.run_dir)
    assert [(r["step"], r["split"]) for r in ddp_lines] == [
        (r["step"], r["split"]) for r in one_lines]
    for a, b in zip(ddp_lines, one_lines, strict=True):
        assert a["codes_used"] == b["codes_used"]
        for key in ("loss", "recon_loss", "perplexity"):
            assert a[key] == pytest.approx(b[key], rel=1e-5), (a["step"], key)


def test_batch_size_not_divisible_by_the_world_fails_clearly(
    manifest: Path, tmp_path: Path
) -> None:
    """Launched as `torchrun mri-vqvae train-vqvae ...` (the console script)."""
    script = Path(sys.executable).parent / "mri-vqvae"
    if not script.is_file():
        pytest.skip("the mri-vqvae console script is not installed beside python")
    proc = _torchrun([str(script), "train-vqvae", "--manifest", str(manifest), "--config",
                      "smoke", "--set", "train_vqvae.batch_size=3", "--runs-root",
                      str(tmp_path / "runs")], timeout=90)
    assert proc.returncode != 0
    assert "train_vqvae.batch_size=3 is the global batch and must be divisible" in proc.stderr
    assert "batch_size=2 or 4" in proc.stderr
    assert not (tmp_path / "runs").exists()


@pytest.mark.slow
def test_ddp_resume_after_a_kill_is_bit_identical(
    manifest: Path, ddp_vqvae: tuple[Path, Path], tmp_path: Path
) -> None:
    """Every rank loads checkpoints/last; rank 0's saved random states serve every rank."""
    runs, dump = tmp_path / "runs", tmp_path / "dump"
    args = ["-m", "pipelines.train_vqvae", "--manifest", str(manifest)]
    killed = _torchrun([*args, "--config", "smoke", *_sets(VQVAE_SETS), "--runs-root",
                        str(runs)], **{KILL_ENV: "3"})
    assert killed.returncode != 0
    (run_dir,) = (runs / "vqvae").iterdir()
    from mri_vqvae.artifacts.resume import load_resume_state

    assert load_resume_state(run_dir / "checkpoints" / "last")["step"] == 2
    resumed = _torchrun([*args, "--resume", str(run_dir)], **{DUMP_ENV: str(dump)})
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    reference = ddp_vqvae[1]
    for rank in (0, 1):
        _assert_equal_states(_dump(dump, rank)["model"], _dump(reference, rank)["model"])
        assert torch.equal(_dump(dump, rank)["rng"], _dump(reference, rank)["rng"])
    run = json.loads((run_dir / "run.json").read_text())
    assert run["status"] == "completed" and run["resumed_from"][0]["step"] == 2


# --- torchrun: encode and train-prior ------------------------------------------------------------


@pytest.fixture(scope="module")
def vqvae_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """A tiny VQ-VAE run and a manifest of 6 cases (4 train, 1 val, 1 test)."""
    from tests.support.runs import save_vqvae_run, write_cases

    splits = {"a": "train", "b": "train", "c": "train", "d": "train", "v": "val", "t": "test"}
    cases = write_cases(tmp_path_factory.mktemp("cases"), splits)
    return save_vqvae_run(tmp_path_factory.mktemp("vqvae") / "run", manifest=cases), cases


def test_ddp_encode_covers_each_case_once_and_writes_the_same_index(
    vqvae_run: tuple[Path, Path], tmp_path: Path
) -> None:
    from mri_vqvae.artifacts.latents import load_latents
    from mri_vqvae.data.manifest import load_manifest
    from mri_vqvae.tasks.encode import encode_manifest

    run, cases = vqvae_run
    out = tmp_path / "ddp"
    proc = _torchrun(["-m", "pipelines.encode", "--vqvae", str(run), "--manifest", str(cases),
                      "--out", str(out), "--device", "cpu"], timeout=90)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.count("encoded 6 case(s)") == 1  # rank 0 alone prints the total
    per_rank = [line.split("encoded ", 1)[1].split("]", 1)[0] + "]"
                for line in proc.stderr.splitlines() if " of 2: encoded " in line]
    shares = sorted(json.loads(ids.replace("'", '"')) for ids in per_rank)
    assert shares == [["a", "b", "c"], ["d", "t", "v"]]  # sorted ids, each on exactly one rank

    single = encode_manifest(run, load_manifest(cases), tmp_path / "one", device="cpu",
                             manifest_path=cases)
    assert sorted(single.encoded) == sorted(sum(shares, []))
    docs = [json.loads((folder / "index.json").read_text()) for folder in (out, tmp_path / "one")]
    for doc in docs:
        doc.pop("updated_utc")
    assert docs[0] == docs[1]  # same grids, same sha256s, same provenance
    assert sorted(load_latents(out).grids) == sorted(c["case_id"] for c in docs[0]["cases"])
    assert not list(out.glob(".*"))  # no temp files left behind


@pytest.mark.slow
def test_ddp_prior_with_dropout_keeps_ranks_identical_and_resumes_exactly(
    vqvae_run: tuple[Path, Path], tmp_path: Path
) -> None:
    """Dropout draws differ per rank (RNG forked per seed, step, rank), the weights do not."""
    from mri_vqvae.data.manifest import load_manifest
    from mri_vqvae.tasks.encode import encode_manifest

    run, cases = vqvae_run
    latents = tmp_path / "lat"
    encode_manifest(run, load_manifest(cases), latents, device="cpu")
    sets = _sets(["train_prior.batch_size=2", "train_prior.max_steps=4", "prior.dropout=0.3",
                  "train_prior.checkpoint_every=2"])
    args = ["-m", "pipelines.train_prior", "--latents", str(latents), "--config", "smoke", *sets]
    ref = _torchrun([*args, "--runs-root", str(tmp_path / "ref")],
                    **{DUMP_ENV: str(tmp_path / "ref_dump")})
    assert ref.returncode == 0, ref.stderr[-3000:]
    assert ref.stdout.count("bits per latent") == 1
    (ref_dir,) = (tmp_path / "ref" / "prior").iterdir()
    assert (ref_dir / "likelihood.json").is_file()
    _assert_equal_states(_dump(tmp_path / "ref_dump", 0)["model"],
                         _dump(tmp_path / "ref_dump", 1)["model"])

    killed = _torchrun([*args, "--runs-root", str(tmp_path / "runs")], **{KILL_ENV: "3"})
    assert killed.returncode != 0
    (run_dir,) = (tmp_path / "runs" / "prior").iterdir()
    resumed = _torchrun(["-m", "pipelines.train_prior", "--resume", str(run_dir)],
                        **{DUMP_ENV: str(tmp_path / "dump")})
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    for rank in (0, 1):
        _assert_equal_states(_dump(tmp_path / "dump", rank)["model"],
                             _dump(tmp_path / "ref_dump", rank)["model"])


# --- torchrun: reconstruct and evaluate ----------------------------------------------------------


@pytest.fixture(scope="module")
def eval_world(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """A tiny VQ-VAE run and a manifest of 5 test cases (shares of 3 and 2) and 2 train."""
    from tests.support.runs import make_manifest, make_vqvae_run

    root = tmp_path_factory.mktemp("eval_world")
    splits = {**{f"a{i}": "test" for i in range(5)}, "b0": "train", "b1": "train"}
    manifest, path = make_manifest(root, splits)
    return {"root": root, "manifest": path, "vqvae": make_vqvae_run(root / "runs",
                                                                    manifest.digest)}


def _csv_rows(path: Path) -> list[dict[str, str]]:
    import csv

    with open(path, newline="") as fh:
        return list(csv.DictReader(fh))


def _same_rows(a: list[dict[str, str]], b: list[dict[str, str]]) -> None:
    assert [r["case_id"] for r in a] == [r["case_id"] for r in b]
    for ra, rb in zip(a, b, strict=True):
        assert ra.keys() == rb.keys()
        for key in ra:
            if key == "case_id" or ra[key] == rb[key]:
                continue
            assert float(ra[key]) == pytest.approx(float(rb[key]), abs=1e-6), (ra["case_id"], key)


def test_ddp_reconstruct_covers_each_case_once_and_writes_the_same_tables(
    eval_world: dict[str, Path], tmp_path: Path
) -> None:
    from mri_vqvae.data.manifest import load_manifest
    from mri_vqvae.tasks.reconstruct import reconstruct_manifest

    out = tmp_path / "ddp"
    proc = _torchrun(["-m", "pipelines.reconstruct", "--vqvae", str(eval_world["vqvae"]),
                      "--manifest", str(eval_world["manifest"]), "--split", "test", "--out",
                      str(out), "--device", "cpu"], timeout=90)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.count("reconstructed 5 case(s)") == 1  # rank 0 alone prints the total
    sidecars = {p.stem: json.loads(p.read_text()) for p in (out / "cases").glob("*.json")}
    assert sorted(sidecars) == [f"a{i}" for i in range(5)]
    sessions = {cid: doc["session"] for cid, doc in sidecars.items()}
    assert len(set(sessions.values())) == 2  # two ranks, each case written by exactly one
    assert sessions["a0"] == sessions["a1"] == sessions["a2"] != sessions["a3"] == sessions["a4"]

    one = tmp_path / "one"
    reconstruct_manifest(eval_world["vqvae"], load_manifest(eval_world["manifest"]), one,
                         split="test", threads=1)
    _same_rows(_csv_rows(out / "metrics.csv"), _csv_rows(one / "metrics.csv"))
    assert _csv_rows(out / "failures.csv") == []
    index = json.loads((out / "index.json").read_text())
    assert [c["case_id"] for c in index["cases"]] == [f"a{i}" for i in range(5)]
    # no temp files left behind (.bidsignore belongs to the BIDS-Derivatives view)
    assert [p.name for p in out.rglob(".*")] == [".bidsignore"]

    script = Path(sys.executable).parent / "mri-vqvae"  # the console script, when installed
    launch = [str(script), "reconstruct"] if script.is_file() else ["-m", "pipelines.reconstruct"]
    again = _torchrun([*launch, "--vqvae", str(eval_world["vqvae"]), "--manifest",
                       str(eval_world["manifest"]), "--split", "test", "--out", str(out),
                       "--device", "cpu"], timeout=90)
    assert again.returncode == 0, again.stderr[-3000:]
    assert "reconstructed 0 case(s), reused 5" in again.stdout  # resume: nothing done twice


def _assert_close(a: Any, b: Any, where: str = "") -> None:
    """Equal JSON documents, floats within 1e-6 (the ranks run with 1 CPU thread)."""
    if isinstance(a, dict):
        assert a.keys() == b.keys(), where
        for key in a:
            _assert_close(a[key], b[key], f"{where}.{key}")
    elif isinstance(a, list):
        assert len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b, strict=True)):
            _assert_close(x, y, f"{where}[{i}]")
    elif isinstance(a, float) and isinstance(b, float):
        assert a == pytest.approx(b, rel=1e-6, abs=1e-6), where
    else:
        assert a == b, where


def _ddp_evaluate(world: dict[str, Path], out: Path, *extra: str) -> dict[str, Any]:
    proc = _torchrun(["-m", "pipelines.evaluate", "--vqvae", str(world["vqvae"]), "--manifest",
                      str(world["manifest"]), "--split", "test", "--out", str(out), "--device",
                      "cpu", "--bootstrap", "200", "--report-cases", "2", *extra], timeout=90)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.count("5 held-out case(s)") == 1  # rank 0 alone prints
    shares = sorted(line.split(": evaluated ", 1)[1].split(" ", 1)[0]
                    for line in proc.stderr.splitlines() if " of 2: evaluated " in line)
    assert shares == ["2", "3"]  # each held-out case on exactly one rank
    return json.loads((out / "metrics.json").read_text())


def _single_evaluate(world: dict[str, Path], out: Path, prior: Path | None = None
                     ) -> dict[str, Any]:
    from mri_vqvae.data.manifest import load_manifest
    from mri_vqvae.evaluation.evaluate import EvaluateSettings, evaluate_runs

    settings = EvaluateSettings(split="test", num_resamples=200, report_cases=2, num_samples=3)
    evaluate_runs(world["vqvae"], load_manifest(world["manifest"]), out, prior_run=prior,
                  settings=settings, device="cpu", manifest_path=world["manifest"])
    return json.loads((out / "metrics.json").read_text())


def test_ddp_evaluate_writes_the_single_process_reconstruction_block(
    eval_world: dict[str, Path], tmp_path: Path
) -> None:
    ddp = _ddp_evaluate(eval_world, tmp_path / "ddp")
    one = _single_evaluate(eval_world, tmp_path / "one")
    _assert_close(ddp["reconstruction"], one["reconstruction"], "reconstruction")
    assert ddp["likelihood"] is None and ddp["samples"] is None
    assert (tmp_path / "ddp" / "report.html").is_file()
    _same_rows(_csv_rows(tmp_path / "ddp" / "per_case.csv"),
               _csv_rows(tmp_path / "one" / "per_case.csv"))


def test_ddp_evaluate_with_a_prior_shards_both_passes(
    eval_world: dict[str, Path], tmp_path: Path
) -> None:
    """Held-out and training bits/latent and the nearest training scans match one process."""
    from mri_vqvae.data.manifest import load_manifest
    from tests.support.runs import make_prior_run

    digest = load_manifest(eval_world["manifest"]).digest
    prior = make_prior_run(tmp_path / "runs", eval_world["vqvae"], digest)
    ddp = _ddp_evaluate(eval_world, tmp_path / "ddp", "--prior", str(prior), "-n", "3")
    one = _single_evaluate(eval_world, tmp_path / "one", prior)
    _assert_close(ddp["reconstruction"], one["reconstruction"], "reconstruction")
    _assert_close(ddp["likelihood"], one["likelihood"], "likelihood")
    _assert_close(ddp["samples"]["memorisation"], one["samples"]["memorisation"], "memorisation")
    assert ddp["likelihood"]["num_train_cases"] == 2
    assert len(list((tmp_path / "ddp" / "samples").glob("*.nii.gz"))) == 3
