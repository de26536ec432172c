"""The ``spcompile`` CLI: every command on at least one example (in-process through ``main``,
except ``run``, which launches 2 gloo processes with torch's launcher)."""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
import textwrap

import pytest
import torch

from spcompile import cli

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
EX = os.path.join(ROOT, "examples")


def run_main(capsys, *argv):
    rc = cli.main(list(argv))
    out = capsys.readouterr()
    return rc, out.out, out.err


def test_help_on_every_command(capsys):
    parser = cli.build_parser()
    commands = parser._subparsers._group_actions[0].choices
    assert {"explain", "passes", "dump", "cost", "calibrate", "run"} <= set(commands)
    for name in commands:
        with pytest.raises(SystemExit) as e:
            cli.main([name, "--help"])
        assert e.value.code == 0
        text = capsys.readouterr().out
        assert f"spcompile {name}" in text and len(text) > 200, name


def test_explain_retnet(capsys):
    rc, out, _ = run_main(capsys, "explain", f"{EX}/retnet.py:factory", "--world-size", "2",
                          "--strategy", "ring")
    assert rc == 0
    assert "plan for P = 2" in out and "rank 0 feeds (2, 32, 32)" in out
    assert "masked_linear_attention" in out and "ring" in out and "retnet.py:" in out
    assert "fallbacks (0)" in out


def test_explain_module_target_and_strict(capsys, tmp_path, monkeypatch):
    (tmp_path / "fftmodel.py").write_text(textwrap.dedent("""
        import torch
        class FFT(torch.nn.Module):
            def forward(self, x):
                return torch.fft.fft(x, dim=1).real * 2
        def factory():
            return FFT(), (torch.randn(2, 8, 4),)
    """))
    monkeypatch.syspath_prepend(str(tmp_path))
    rc, out, _ = run_main(capsys, "explain", "fftmodel:factory", "-P", "2")
    assert rc == 0 and "fallbacks (1)" in out and "fft" in out
    rc, out, err = run_main(capsys, "explain", "fftmodel:factory", "-P", "2", "--strict")
    assert rc == 1 and "SequenceParallelError" in err and "fft" in err


def test_bad_target_is_one_clear_line(capsys):
    rc, _, err = run_main(capsys, "explain", "no/such/file.py:factory")
    assert rc == 2 and "no file" in err
    rc, _, err = run_main(capsys, "explain", f"{EX}/retnet.py:nothing")
    assert rc == 2 and "no callable 'nothing'" in err
    rc, _, err = run_main(capsys, "explain", f"{EX}/retnet.py:factory", "-P", "3")
    assert rc == 2 and "not divisible" in err


def test_passes(capsys):
    rc, out, _ = run_main(capsys, "passes", "--disable", "fallback")
    assert rc == 0
    names = ["canonicalize", "sequence_axis", "detect", "plan", "rewrite", "fallback", "verify"]
    pos = [out.index(f"{i}. {n}") for i, n in enumerate(names, start=1)]
    assert pos == sorted(pos)
    assert "fallback       disabled" in out and "detect         enabled" in out
    assert "declared_scan" in out and "masked_linear_attention" in out
    rc, _, err = run_main(capsys, "passes", "--disable", "nonsense")
    assert rc == 2 and "unknown pass" in err


def test_dump_writes_text_and_dot_per_pass(capsys, tmp_path):
    rc, out, _ = run_main(capsys, "dump", f"{EX}/lightning.py:factory", "--out",
                          str(tmp_path), "-P", "2")
    assert rc == 0
    files = sorted(os.listdir(tmp_path))
    for p in ("canonicalize", "detect", "rewrite", "fallback"):
        for when in ("before", "after"):
            assert f"g0_{[n for n in files if p in n][0].split('_')[1]}_{p}_{when}.txt" in files
            assert any(f.endswith(f"{p}_{when}.dot") for f in files)
    after = open(tmp_path / [f for f in files if f.endswith("rewrite_after.txt")][0]).read()
    before = open(tmp_path / [f for f in files if f.endswith("rewrite_before.txt")][0]).read()
    assert "declared_scan" in before and "declared_scan" not in after and "scan" in after
    dot = open(tmp_path / [f for f in files if f.endswith("rewrite_after.dot")][0]).read()
    assert dot.startswith("digraph") and "->" in dot and "+rewrite" in dot
    if shutil.which("dot"):
        assert any(f.endswith(".svg") for f in files)
    else:
        assert "no SVG" in out


def test_cost_and_calibrate_are_the_cost_models(capsys):
    rc, out, _ = run_main(capsys, "cost", "--P", "2,4", "--T", "4096")
    assert rc == 0 and "allscan" in out and "allgather" in out
    with pytest.raises(SystemExit) as e:
        cli.main(["calibrate", "--help"])
    assert e.value.code == 0 and "calibrate" in capsys.readouterr().out


def test_run_nproc_2_launches_gloo_ranks(tmp_path):
    script = tmp_path / "tiny.py"
    script.write_text(textwrap.dedent("""
        import sys
        import torch, torch.distributed as dist
        import spcompile
        dist.init_process_group("gloo")
        r, P = dist.get_rank(), dist.get_world_size()
        x = torch.arange(8.0).view(1, 8, 1)
        full = spcompile.gather_sequence(spcompile.shard_sequence(x, 1), 1)
        assert torch.equal(full, x)
        print(f"rank {r} of {P} ok, args {sys.argv[1:]}", flush=True)
        dist.destroy_process_group()
    """))
    env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
    res = subprocess.run([sys.executable, "-m", "spcompile.cli", "run", "--nproc", "2",
                          str(script), "--", "--flag", "v"], capture_output=True, text=True,
                         env=env, timeout=180, cwd=ROOT)
    assert res.returncode == 0, res.stdout + res.stderr
    assert "torch.distributed.run --nproc-per-node=2 --standalone" in res.stdout
    for r in (0, 1):
        assert f"rank {r} of 2 ok, args ['--flag', 'v']" in res.stdout


def test_run_main_job_tiny(tmp_path):
    """The main job through `spcompile run --nproc 2`, shrunk: the equivalence check passes,
    the loss goes down, the PNG and metrics are written."""
    import json
    out = tmp_path / "lm"
    res = subprocess.run(
        [sys.executable, "-m", "spcompile.cli", "run", "--nproc", "2",
         os.path.join(EX, "train_lm.py"), "--steps", "12", "--batch", "2", "--seq-len", "64",
         "--d-model", "32", "--layers", "2", "--data-bytes", "300000", "--eval-batches", "1",
         "--sample", "0", "--log-every", "4", "--out", str(out)],
        capture_output=True, text=True, timeout=300, cwd=ROOT,
        env=dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", "")))
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    assert "-> PASS" in res.stdout and "tok/s" in res.stdout
    m = json.loads((out / "metrics.json").read_text())
    assert m["world_size"] == 2 and m["final_loss"] < m["first_loss"], m
    assert (out / "loss.png").stat().st_size > 1000
