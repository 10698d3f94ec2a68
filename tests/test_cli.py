"""The `diffsamplers` command line: the testbed bench, and one line + an exit status for every mistake."""

import json
import os
import subprocess
import sys

import pytest

from diffsamplers.eval import cli
from diffsamplers.eval.cli import main


def one_line_error(capsys, after_progress_bars: bool = False) -> str:
    """The error line on stderr: the only line, or, where a model was loaded, the last one after progress bars."""
    err = capsys.readouterr().err
    lines = err.strip().splitlines()
    assert "Traceback" not in err
    assert len(lines) == 1 or (after_progress_bars and all("it/s]" in line for line in lines[:-1])), err
    assert lines[-1].startswith("diffsamplers: error: "), err
    return lines[-1]


def test_bench_writes_results_and_plot(tmp_path, capsys):
    out = tmp_path / "bench"
    code = main(["bench", "--model", "testbed", "--samplers", "ddim,dpmpp2m", "--nfe", "5,10", "--num-samples", "4",
                 "--out", str(out)])
    assert code == 0
    records = json.loads((out / "results.json").read_text())
    assert {(r["sampler"], r["nfe"]) for r in records} == {("ddim", 5), ("ddim", 10), ("dpmpp2m", 5), ("dpmpp2m", 10)}
    for r in records:
        assert set(r) >= {"sampler", "budget", "nfe", "rmse_vs_gt", "seconds_per_image"}
        assert r["budget"] == r["nfe"] and 0 < r["rmse_vs_gt"] < 1
    err = {(r["sampler"], r["nfe"]): r["rmse_vs_gt"] for r in records}
    assert err[("ddim", 10)] < err[("ddim", 5)]
    assert os.path.getsize(out / "rmse_vs_nfe.png") > 1000
    assert "dpmpp2m" in capsys.readouterr().out
    # a second run into the same folder keeps the first one's results
    before = (out / "results.json").read_text()
    assert main(["bench", "--model", "testbed", "--samplers", "ddim", "--nfe", "5", "--out", str(out)]) == 2
    assert "--overwrite" in one_line_error(capsys)
    assert (out / "results.json").read_text() == before


@pytest.fixture
def prompts_file(tmp_path):
    path = tmp_path / "prompts.txt"
    path.write_text("a cat\n")
    return str(path)


# (arguments, a fragment of the one-line message); every one is refused before a model is loaded
USAGE_MISTAKES = [
    (["--model", "/nonexistent"], "--model /nonexistent: no such folder"),
    (["--model", "not a repo"], "not a Hub repo id"),
    (["--gt-steps", "0"], "argument --gt-steps: expected a positive integer, got '0'"),
    (["--gt-steps", "-5"], "argument --gt-steps: expected a positive integer, got '-5'"),
    (["--num-samples", "0"], "argument --num-samples"),
    (["--nfe", "0,5"], "argument --nfe"),
    (["--samplers", ","], "argument --samplers: expected comma-separated sampler names"),
    (["--samplers", "ddim,nope"], "--samplers: unknown nope"),
    (["--seed", "-1"], "argument --seed"),
    (["--prompts", "{prompts}"], "--prompts: --model digits is unconditional"),
    (["--model", "testbed", "--prompts", "{prompts}"], "--prompts: --model testbed is unconditional"),
    (["--guidance-scale", "3"], "--guidance-scale: it needs --prompts"),
    (["--model", "digits-latent", "--prompts", "{prompts}"],
     "--prompts: --model digits-latent is class-conditional (classes from the seeds)"),
    (["--model", "digits-latent", "--guidance-scale", "x"], "argument --guidance-scale"),
    (["--model", "digits-latent", "--inception", "{prompts}"], "--inception: --model digits-latent does not use"),
    (["--model", "testbed", "--features", "digits"], "--features: --model testbed does not use it"),
    (["--model", "testbed", "--features", "inception"], "--features: --model testbed does not use it"),
    (["--model", "testbed", "--gt-steps", "10"], "--gt-steps: --model testbed does not use it"),
    (["--model", "testbed", "--device", "cuda"], "--device: the testbed runs on the CPU"),
    (["--inception", "{prompts}"], "--inception: --model digits does not use it"),
    (["--features", "auto"], "argument --features: invalid choice"),
    (["--out", "{prompts}"], "exists and is not a folder"),
    (["--no-such-option"], "unrecognized arguments: --no-such-option"),
]


@pytest.mark.parametrize("args, message", USAGE_MISTAKES, ids=[" ".join(a) for a, _ in USAGE_MISTAKES])
def test_usage_mistakes_get_one_line_and_exit_2(args, message, prompts_file, tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    args = [a.format(prompts=prompts_file) for a in args]
    argv = ["bench", *args] if "--out" in args else ["bench", *args, "--out", str(tmp_path / "out")]
    assert main(argv) == 2
    assert message in one_line_error(capsys)
    assert not (tmp_path / "out").exists()  # nothing ran: no ground-truth manifest to trip the next run


def test_no_command_and_bad_pipeline_folder(tmp_path, capsys):
    assert main([]) == 2
    assert "required: COMMAND" in one_line_error(capsys)
    (tmp_path / "folder").mkdir()
    assert main(["bench", "--model", str(tmp_path / "folder"), "--out", str(tmp_path / "out")]) == 2
    assert "no model_index.json" in one_line_error(capsys)


def test_cuda_without_a_gpu(tmp_path, capsys):
    import torch

    if torch.cuda.is_available():
        pytest.skip("a CUDA device is present")
    assert main(["bench", "--device", "cuda", "--out", str(tmp_path / "out")]) == 2
    assert "--device cuda: no CUDA device is available" in one_line_error(capsys)
    assert not (tmp_path / "out").exists()


def test_an_uncached_hub_repo_offline(tmp_path, capsys, monkeypatch):
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)  # as CI runs (HF_HUB_OFFLINE=1)
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))  # an empty cache
    assert main(["bench", "--model", "foo/bar", "--device", "cpu", "--out", str(tmp_path / "out")]) == 1
    message = one_line_error(capsys)
    assert "--model foo/bar: the Hub repo" in message and "could not be loaded" in message
    assert not (tmp_path / "out").exists()


def test_ctrl_c_keeps_the_cache_and_exits_130(tmp_path, capsys, monkeypatch):
    from diffsamplers.eval import bench

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(bench, "sample_with", interrupted)  # Ctrl-C while the ground truth is being sampled
    out = tmp_path / "out"
    assert main(["bench", "--samplers", "ddim", "--nfe", "4", "--num-samples", "4", "--gt-steps", "5",
                 "--device", "cpu", "--out", str(out)]) == 130
    err = capsys.readouterr().err
    cache = out / "ground_truth"
    # progress bars may come before it, a traceback must not
    assert err.strip().splitlines()[-1] == (
        f"diffsamplers: interrupted; the ground truth cache in {cache} is kept, rerun to resume"
    )
    assert "Traceback" not in err and "KeyboardInterrupt" not in err
    assert cache.is_dir() and not (out / "results.json").exists()


def test_ctrl_c_on_the_testbed(tmp_path, capsys, monkeypatch):
    from diffsamplers.eval import testbed

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(testbed, "exact_testbed_errors", interrupted)
    assert main(["bench", "--model", "testbed", "--out", str(tmp_path / "out")]) == 130
    assert capsys.readouterr().err.strip().splitlines() == ["diffsamplers: interrupted"]


def test_a_refused_ground_truth_cache_is_one_line_and_exit_1(tmp_path, capsys, monkeypatch):
    from diffsamplers.eval import bench

    def stale(*args, **kwargs):
        raise ValueError("bench-out/ground_truth was made with other settings; refusing to reuse it")

    monkeypatch.setattr(bench, "generate_ground_truth", stale)
    assert main(["bench", "--samplers", "ddim", "--nfe", "4", "--num-samples", "4", "--device", "cpu",
                 "--out", str(tmp_path / "out")]) == 1
    assert "refusing to reuse it" in one_line_error(capsys, after_progress_bars=True)


def test_list_gives_one_line_per_sampler(capsys):
    from diffsamplers.eval.samplers import bench_registry

    assert main(["bench", "--list"]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    registry = bench_registry("digits")
    assert {"dpmpp2m", "bdia", "dpmpp2m+teleport", "slam", "lcd-det"} <= set(registry)
    assert [line.split()[0] for line in lines] == list(registry)
    for line, spec in zip(lines, registry.values()):
        name, description = line.split(None, 1)
        assert len(description) > 10 and description.startswith(spec.description)
        assert description.endswith("(on request)") == (not spec.default)


def test_help_and_version_import_no_torch():
    # what the console script does, in a fresh interpreter: --help and --version answer before torch is imported
    script = (
        "import sys\n"
        "from diffsamplers.eval.cli import main\n"
        "for argv in (['--help'], ['bench', '--help'], ['--version']):\n"
        "    assert main(argv) == 0\n"
        "assert 'torch' not in sys.modules and 'diffusers' not in sys.modules, 'imported torch'\n"
    )
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    import diffsamplers

    assert f"diffsamplers {diffsamplers.__version__}" in done.stdout
    # the help shows the defaults, and no reStructuredText markup
    text = " ".join(done.stdout.split())  # argparse wraps at the terminal's width
    assert "(default: 200;" in text and "(default: bench-out)" in text
    assert "``" not in done.stdout


def test_cli_defaults_are_the_bench_defaults():
    from diffsamplers.eval import bench

    assert cli.GT_STEPS == bench.GT_STEPS


@pytest.mark.parametrize(
    "args, message",
    [
        (["--teacher", "{tmp}", "--data", "digits"], "--teacher"),
        (["--teacher", "digits", "--data", "{tmp}/none.safetensors"], "--data"),
        (["--teacher", "digits", "--data", "digits", "--batch-size", "0"], "--batch-size"),
        (["--teacher", "digits", "--data", "digits", "--loss-type", "l1"], "argument --loss-type"),
    ],
)
def test_distill_mistakes_get_one_line(args, message, tmp_path, capsys):
    """`diffsamplers distill` is a sub-command of the same console script, with the same one-line errors."""
    argv = ["distill", *[a.replace("{tmp}", str(tmp_path)) for a in args], "--out", str(tmp_path / "student")]
    assert main(argv) == 2
    assert message in one_line_error(capsys)


def test_distill_is_listed_in_the_help(capsys):
    assert main(["--help"]) == 0
    assert "distill" in capsys.readouterr().out


def test_latent_guidance_default_is_the_models():
    from diffsamplers.models.digits_latent import DEFAULT_GUIDANCE_SCALE

    assert cli.LATENT_GUIDANCE_SCALE == DEFAULT_GUIDANCE_SCALE


def test_list_for_the_latent_model_has_the_per_class_teleport(capsys):
    assert main(["bench", "--model", "digits-latent", "--list"]) == 0
    names = [line.split()[0] for line in capsys.readouterr().out.strip().splitlines()]
    assert {"dpmpp2m+teleport", "dpmpp2m+teleport-class", "unipc+teleport-class"} <= set(names)


def test_latent_bench_takes_a_guidance_scale(tmp_path, capsys):
    out = tmp_path / "out"
    argv = ["bench", "--model", "digits-latent", "--guidance-scale", "1.5", "--samplers", "ddim", "--nfe", "4",
            "--num-samples", "4", "--gt-steps", "8", "--device", "cpu", "--out", str(out)]
    assert main(argv) == 0
    assert "guidance scale 1.5" in capsys.readouterr().out
    assert json.loads((out / "results.json").read_text())[0]["sampler"] == "ddim"
