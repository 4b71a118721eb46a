"""The real thing in a temporary git + DVC repository: dvc repro, dvc exp run -S, a queued sweep, MLflow."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import numpy as np
import pytest
import yaml
from PIL import Image

from ijepa import load_encoder

from .helpers import ROOT, debug_project, free_port, git_init, run_queue, sh

# One DVC chain per test run, built by the module's `repo` fixture; `make test` runs a file's tests in one pytest-xdist
# worker (--dist loadfile), so every test here reads that one chain.
pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def project(tmp_path_factory) -> Path:
    """A copy of the project's tracked files as a fresh git repo whose default params are the debug overlay."""
    repo = debug_project(tmp_path_factory.mktemp("project"))
    git_init(repo)
    return repo


@pytest.fixture(scope="module")
def chain(project) -> subprocess.CompletedProcess:
    """`make repro`'s command run once in ``project``: what every test of this module starts from, so that each
    of them also runs alone (`pytest tests/test_pipeline.py::<test>`)."""
    return sh(project, sys.executable, "scripts/time_repro.py", "--json", "chain_time.json")


@pytest.fixture(scope="module")
def repo(project, chain) -> Path:
    """The project after the whole chain ran in it."""
    return project


def mlflow_runs(repo: Path, filter_string: str = ""):
    from mlflow.tracking import MlflowClient

    client = MlflowClient(f"sqlite:///{repo}/mlflow.db")
    exp = client.get_experiment_by_name("ijepa")
    return client, exp, client.search_runs([exp.experiment_id], filter_string=filter_string)


STAGES = [
    *("prepare", "pretrain", "extract", "linprobe", "attnprobe", "lowshot", "knn", "search", "finetune"),
    *("seg_prepare", "seg_train", "seg_eval"),
]


def test_make_repros_command_runs_every_stage_in_order_and_records_their_times(repo, chain):
    r = chain  # what `make repro` runs
    assert "Running stage 'prepare'" in r.stdout and "Running stage 'pretrain'" in r.stdout
    # MLflow loads each logged model back to check its input example: it once failed for the segmenter
    assert "Failed to validate serving input" not in r.stdout + r.stderr and "Got error" not in r.stdout + r.stderr
    timed = json.loads((repo / "chain_time.json").read_text())
    assert list(timed["stages"]) == STAGES
    assert all(t > 0 for t in timed["stages"].values()) and sum(timed["stages"].values()) <= timed["total_s"]
    assert timed["peak_rss_mb"] > 100 and "peak memory of one process" in r.stdout
    recorded = json.loads((repo / "outputs/stage_times.json").read_text())  # for scripts/recipe_study.py
    assert sorted(k.split(":")[0] for k in recorded) == sorted(timed["stages"])
    assert sorted(recorded.values()) == sorted(timed["stages"].values())


def test_the_chain_writes_every_stages_metrics_models_and_plots(repo):
    prep = json.loads((repo / "metrics/prepare.json").read_text())
    assert prep["train_images"] == 110 and prep["val_images"] == 10 and prep["test_images"] == 40
    pre = json.loads((repo / "metrics/pretrain.json").read_text())
    assert pre["steps"] == 110 // 16 and pre["epochs"] == 1
    enc = load_encoder(repo / "models/pretrain/jepa-latest.pth.tar")
    assert enc.depth == 1 and enc.patch_size == 4
    assert (repo / "plots/pretrain_curves.png").stat().st_size > 1000
    for stage in STAGES[2:]:
        assert (repo / f"metrics/{stage}.json").is_file(), stage
    assert set(json.loads((repo / "metrics/linprobe.json").read_text())) >= {"top1", "random_init_top1", "pixels_top1"}
    ft = json.loads((repo / "metrics/finetune.json").read_text())  # the same recipe from a random start beside it
    assert (
        ft["gap_vs_random_init"] == round(ft["top1"] - ft["random_init_top1"], 5) and 0 <= ft["random_init_top1"] <= 1
    )
    assert 0 <= ft["lp_val_top1"] <= 1 and 0 <= ft["random_init_lp_val_top1"] <= 1  # LP-FT: each head fitted first
    assert not list((repo / "models/resume").glob("finetune*")) and (repo / "models/finetune/classifier.pth").is_file()
    seg = json.loads((repo / "metrics/seg_eval.json").read_text())
    assert {"miou", "pixel_acc", "random_init_miou", "per_class_iou"} <= set(seg)


def test_a_second_repro_runs_nothing_whatever_bytecode_lies_in_the_code(repo):
    for code in ("ijepa", "ijepa/models", "pipeline"):  # bytecode that an import, a test or an editor leaves
        (repo / code / "__pycache__").mkdir(exist_ok=True)  # changes no stage's code (.dvcignore)
        (repo / code / "__pycache__" / "stray.cpython-311.pyc").write_bytes(b"not code")
    t0 = time.perf_counter()
    again = sh(repo, "dvc", "repro")
    assert "Data and pipelines are up to date" in again.stdout and time.perf_counter() - t0 < 20


def test_mlflow_holds_one_run_per_stage_with_its_params_metrics_and_plots(repo):
    client, exp, runs = mlflow_runs(repo)
    assert exp.artifact_location == (repo / "mlruns").as_uri()
    by_stage = {r.data.tags["ijepa.stage"]: r for r in runs}
    assert set(by_stage) == set(STAGES)
    assert by_stage["prepare"].data.tags["ijepa.pipeline_run"] == by_stage["pretrain"].data.tags["ijepa.pipeline_run"]
    pr, pre = by_stage["pretrain"], json.loads((repo / "metrics/pretrain.json").read_text())
    assert pr.data.params["pretrain.batch_size"] == "16" and pr.data.tags["git.commit"]
    assert len(client.get_metric_history(pr.info.run_id, "loss")) == pre["steps"]
    artifacts = {a.path for a in client.list_artifacts(pr.info.run_id, "plots")}
    assert artifacts == {"plots/pretrain_curves.png", "plots/pretrain_monitor.png"}
    health = client.get_metric_history(pr.info.run_id, "monitor_rankme")
    assert [m.step for m in health] == [0, pre["steps"]] and pre["final_rankme"] == health[-1].value


def test_dvc_metrics_show_and_plots_show_read_the_chain(repo):
    shown = json.loads(sh(repo, "dvc", "metrics", "show", "--json").stdout)
    assert "metrics/pretrain.json" in json.dumps(shown)
    plots = json.loads(sh(repo, "dvc", "plots", "show", "--json").stdout)["data"]
    for name in ("pretrain_rankme", "pretrain_online_knn", "plots/pretrain_monitor.png", "plots/lowshot.png"):
        assert name in plots, name


SERVE = """
import json, sys
import mlflow.pyfunc, numpy as np
from mlflow.tracking import MlflowClient
from ijepa.data.transforms import EvalTransform, build_batch
from ijepa.finetune import load_classifier
from ijepa.inference import read_bgr
files = sys.argv[1:]
mlflow.set_tracking_uri("sqlite:///mlflow.db")
client = MlflowClient()
_, names, pre = load_classifier("models/finetune/classifier.pth")
rgb = build_batch([read_bgr(f) for f in files], EvalTransform(pre.crop_size, pre.resize_size)).numpy()[..., ::-1]
out = {"versions": {}, "signatures": {}}
for name in ("ijepa-encoder", "ijepa-classifier", "ijepa-segmenter"):
    mv = client.get_model_version_by_alias(name, "repro")
    out["versions"][name] = client.get_run(mv.run_id).data.tags["ijepa.stage"]
    out["signatures"][name] = str(mlflow.models.get_model_info(f"models:/{name}@repro").signature.inputs)
rgb = np.ascontiguousarray(rgb, dtype=np.float32)  # the signature's float32, values 0-255
probs = mlflow.pyfunc.load_model("models:/ijepa-classifier@repro").predict(rgb)
out["classes"] = [names[i] for i in np.asarray(probs).argmax(1)]
features = mlflow.pyfunc.load_model("models:/ijepa-encoder@repro").predict(rgb)
out["feature_shape"] = list(np.asarray(features).shape)
print(json.dumps(out))
"""


@pytest.fixture(scope="module")
def classified(repo, tmp_path_factory) -> tuple[list[str], dict[str, str]]:
    """Six test images of the chain's shards written as PNG files, and the class `ijepa classify` gives each."""
    import csv

    tmp_path = tmp_path_factory.mktemp("classified")

    from ijepa.data import shard_urls
    from ijepa.data.loaders import read_images

    urls = shard_urls(repo / "data/shards", "test")
    keys = [f"{i:08d}" for i in range(6)]
    images = tmp_path / "images"
    images.mkdir()
    for key, img in read_images(urls, keys).items():
        Image.fromarray(img.permute(1, 2, 0).numpy()).save(images / f"{key}.png")
    files = sorted(str(p) for p in images.iterdir())
    sh(repo, sys.executable, "-m", "ijepa.cli", "classify", "--checkpoint", "models/finetune/classifier.pth",
       "--input", str(images), "--output", str(tmp_path / "p.csv"))  # fmt: skip
    with open(tmp_path / "p.csv") as f:
        return files, {r["path"]: r["prediction"] for r in csv.DictReader(f)}


def test_make_repro_registers_three_models_that_predict_like_the_commands(repo, classified):
    """The workspace run registered ijepa-encoder/-classifier/-segmenter under the alias `repro`; the classifier
    loaded as an MLflow pyfunc predicts on an image batch the classes `ijepa classify` writes."""
    files, by_path = classified
    served = json.loads(sh(repo, sys.executable, "-c", SERVE, *files).stdout)
    assert served["versions"] == {
        "ijepa-encoder": "pretrain", "ijepa-classifier": "finetune", "ijepa-segmenter": "seg_train"
    }  # fmt: skip
    # float32 values 0-255: MLflow's JSON parsing would truncate fractions into a uint8 signature unseen
    assert all("float32" in sig for sig in served["signatures"].values()), served["signatures"]
    assert served["classes"] == [by_path[f] for f in files]
    assert served["feature_shape"][0] == len(files)


def post(port: int, body: str) -> tuple[int, dict]:
    req = urllib.request.Request(
        f"http://127.0.0.1:{port}/invocations", body.encode(), {"Content-Type": "application/json"}
    )
    try:
        with urllib.request.urlopen(req, timeout=60) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read())


def test_make_serve_answers_like_ijepa_classify_and_refuses_bad_requests(repo, classified):
    """`make serve` (MLflow's server on loopback) serves the registered classifier: real images in, the classes
    `ijepa classify` gives out; malformed requests get a 400 with the reason, and the server keeps serving."""
    from ijepa.data.transforms import EvalTransform, build_batch
    from ijepa.finetune import load_classifier
    from ijepa.inference import read_bgr

    files, by_path = classified
    _, names, pre = load_classifier(repo / "models/finetune/classifier.pth")
    rgb = build_batch([read_bgr(f) for f in files], EvalTransform(pre.crop_size, pre.resize_size)).numpy()[..., ::-1]
    port = free_port()
    env = {k: v for k, v in os.environ.items() if k not in ("MLFLOW_TRACKING_URI", "MAKEFLAGS", "MFLAGS")}
    server = subprocess.Popen(
        ["make", "-s", "-C", str(ROOT), "serve", f"SERVE_PORT={port}", f"TRACKING_URI=sqlite:///{repo}/mlflow.db"],
        env=env | {"MLFLOW_DISABLE_TELEMETRY": "true"}, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
        start_new_session=True,
    )  # fmt: skip
    try:
        deadline = time.monotonic() + 180
        while True:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/ping", timeout=5):
                    break
            except OSError:
                assert server.poll() is None, server.stdout.read().decode()[-3000:]
                assert time.monotonic() < deadline, "make serve did not answer in 180 s"
                time.sleep(1)
        status, out = post(port, json.dumps({"inputs": rgb.tolist()}))
        assert status == 200, out
        probs = np.array(out["predictions"])
        assert probs.shape == (len(files), len(names)) and np.allclose(probs.sum(1), 1, atol=1e-4)
        assert [names[i] for i in probs.argmax(1)] == [by_path[f] for f in files]
        bad = {
            "no channel axis": json.dumps({"inputs": rgb[..., 0].tolist()}),
            "another image size": json.dumps({"inputs": np.zeros((1, 64, 64, 3), int).tolist()}),
            "values outside 0-255": json.dumps({"inputs": (rgb.astype(int) - 300).tolist()}),
            "not JSON": "images please",
            "images scaled to 0-1": json.dumps({"inputs": (rgb / 255.0).tolist()}),
        }
        for what, body in bad.items():
            status, out = post(port, body)
            assert status == 400 and out["message"], (what, status, out)
        # the model's own check: MLflow's generic message, the model's reason in the response's stack_trace
        assert "expected RGB values as integers 0-255" in post(port, bad["values outside 0-255"])[1]["stack_trace"]
        assert "valid JSON" in post(port, bad["not JSON"])[1]["message"]
        assert "scaled to 0-1 or normalised?" in post(port, bad["images scaled to 0-1"])[1]["stack_trace"]
        status, out = post(port, json.dumps({"inputs": rgb[:2].tolist()}))  # still serving
        assert status == 200 and len(out["predictions"]) == 2
    finally:
        os.killpg(server.pid, signal.SIGTERM)
        server.wait(timeout=30)


def test_a_teammate_pulls_the_chain_from_a_remote_into_another_folder(repo, tmp_path):
    """`make remote` + `dvc push` from a finished chain; a clone in another folder pulls, `dvc status` reports
    everything up to date and `dvc repro` runs nothing (the downstream stages start from the pulled encoder);
    extract and search forced to rerun there write the same bytes as in the chain's folder, and `ijepa search`
    finds the encoder the index records."""
    mine = tmp_path / "mine"
    shutil.copytree(repo, mine, ignore=shutil.ignore_patterns("mlflow.db", "mlruns"))
    sh(mine, "make", "-s", "-o", ".venv/.installed", "remote", f"REMOTE={tmp_path / 'remote'}")
    sh(mine, "git", "add", "-A")
    sh(mine, "git", "commit", "-qm", "chain results and the remote")
    sh(mine, "dvc", "push")
    theirs = tmp_path / "elsewhere" / "theirs"
    theirs.parent.mkdir()
    sh(tmp_path, "git", "clone", "-q", str(mine), str(theirs))
    assert not (theirs / "models/pretrain").exists()
    sh(theirs, "dvc", "pull")
    assert (theirs / "models/pretrain/jepa-latest.pth.tar").read_bytes() == (
        mine / "models/pretrain/jepa-latest.pth.tar"
    ).read_bytes()
    status = sh(theirs, "dvc", "status")
    assert "Data and pipelines are up to date" in status.stdout, status.stdout
    again = sh(theirs, "dvc", "repro")
    assert "Running stage" not in again.stdout and "Data and pipelines are up to date" in again.stdout
    # portable outputs: extract and search rerun in this other folder write the bytes the chain wrote in its own,
    # so dvc.lock does not change and a shared cache hits (paths inside outputs are relative to the repository)
    outputs = ["data/features/pretrained.pt", "data/features/random_init.pt", "models/search/index.pt"]
    sh(theirs, "dvc", "repro", "--force", "--single-item", "extract", "search")
    for out in outputs:
        assert (theirs / out).read_bytes() == (mine / out).read_bytes(), out
    assert sh(theirs, "git", "status", "--porcelain", "dvc.lock").stdout == ""
    from ijepa.eval.search import SearchIndex

    index = SearchIndex.load(theirs / "models/search/index.pt")
    assert index.meta["checkpoint"] == "models/pretrain/jepa-latest.pth.tar"
    Image.fromarray(np.full((28, 28, 3), 128, np.uint8)).save(tmp_path / "query.png")
    # from outside the clone: the recorded relative path is found from the folders holding the index
    found = sh(tmp_path, sys.executable, "-m", "ijepa.cli", "search", "--index", str(theirs / "models/search/index.pt"),
               "--query", "query.png", "--k", "2")  # fmt: skip
    assert [json.loads(line)["rank"] for line in found.stdout.splitlines()] == [1, 2]


def test_a_failed_prepare_keeps_the_previous_shards(repo):
    """DVC deletes a stage's outputs before its command runs unless they persist: prepare's shards and metrics
    persist, so a failing `dvc repro` leaves them (the stage itself swaps new shards in only when complete)."""
    import gzip

    bad = repo / "fixtures/bad_fm"
    bad.mkdir(parents=True)
    for name in ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz", "t10k-images-idx3-ubyte.gz",
                 "t10k-labels-idx1-ubyte.gz"):  # fmt: skip
        (bad / name).write_bytes(gzip.compress(b"xx"))
    kept = [*(repo / "data/shards").rglob("*"), repo / "metrics/prepare.json"]
    before = {p: p.read_bytes() for p in kept if p.is_file()}
    assert len(before) > 2
    params = (repo / "params.yaml").read_text()
    changed = yaml.safe_load(params)
    changed["prepare"]["source"]["dir"] = "fixtures/bad_fm"
    (repo / "params.yaml").write_text(yaml.safe_dump(changed, sort_keys=False))
    try:
        r = sh(repo, "dvc", "repro", "prepare", check=False)
    finally:
        (repo / "params.yaml").write_text(params)
        shutil.rmtree(bad)
    assert r.returncode != 0 and "train-images-idx3-ubyte.gz is too short to be an idx file" in r.stderr + r.stdout
    assert "Traceback" not in r.stderr + r.stdout
    assert {p: p.read_bytes() for p in kept if p.is_file()} == before
    assert "Data and pipelines are up to date" in sh(repo, "dvc", "repro").stdout


def test_exp_run_with_set_params(repo):
    # the pretrain stage as target: what -S changes and what reruns is the point, not the downstream stages
    # what the experiment rewrites outside DVC's cache: params, lock, and the metrics and plots git tracks
    kept = {p: p.read_bytes() for p in [repo / "params.yaml", repo / "dvc.lock", *(repo / "metrics").iterdir(),
                                        *(repo / "plots").iterdir()] if p.is_file()}  # fmt: skip
    sh(repo, "dvc", "exp", "run", "-n", "small-ep2", "-S", "model=vit_small", "-S", "pretrain.epochs=2", "pretrain")
    assert (repo / "params.yaml").read_bytes() != kept[repo / "params.yaml"]  # a workspace experiment: applied
    shown = json.loads(sh(repo, "dvc", "exp", "show", "--json").stdout)
    text = json.dumps(shown)
    assert "small-ep2" in text and '"name": "vit_small"' in text.replace("'", '"')
    _, _, runs = mlflow_runs(repo, "tags.`dvc.exp_name` = 'small-ep2'")
    stages = {r.data.tags["ijepa.stage"]: r for r in runs}
    assert "pretrain" in stages and "prepare" not in stages  # prepare's params did not change: not rerun
    assert stages["pretrain"].data.params["model.name"] == "vit_small"
    assert stages["pretrain"].data.metrics["steps"] == 2 * (110 // 16)
    # undone: those files back as they were, the chain's cached outputs checked out of DVC's cache (the tests
    # below then read and extend the chain, not this experiment)
    for path, data in kept.items():
        path.write_bytes(data)
    sh(repo, "dvc", "checkout")
    assert "Data and pipelines are up to date" in sh(repo, "dvc", "status").stdout
    assert load_encoder(repo / "models/pretrain/jepa-latest.pth.tar").depth == 1


def test_seed_runs_and_their_table(repo, capsys):
    """What `make seeds` runs for one seed (an experiment in a temporary copy), then its table. The experiment
    stops at the two probes the assertions read (and what they depend on); the whole chain is the first test's."""
    before = (repo / "metrics/linprobe.json").read_text()
    sh(repo, "dvc", "exp", "run", "--temp", "-n", "seeds-ijepa-seed1", "-S", "seed=1", "-S", "objective=ijepa",
       "linprobe", "attnprobe")  # fmt: skip
    r = sh(repo, sys.executable, "scripts/seed_table.py", "--prefix", "seeds")
    row = next(line for line in r.stdout.splitlines() if line.startswith("| ijepa | 1 |"))
    shown = json.loads(sh(repo, "dvc", "exp", "show", "--json").stdout)
    from scripts.seed_table import experiments

    (exp,) = experiments(shown, "seeds")
    assert exp["seed"] == 1 and exp["objective"] == "ijepa" and exp["probe"] is not None
    older = [c | {"rev": "0" * 40} for c in json.loads(json.dumps(shown))]  # the name again on an older commit
    assert experiments(shown + older, "seeds") == [exp]  # as `dvc exp show -A` lists it: the newest one counts
    assert experiments(shown, ("other", "seeds-ijepa-")) == [exp] and experiments(shown, ("other",)) == []
    assert "skipped seeds-ijepa-seed1 of 0000000: a newer experiment has the name" in capsys.readouterr().err
    every = sh(repo, sys.executable, "scripts/seed_table.py", "--prefix", "seeds", "-A", "--view", "gate")
    assert row in every.stdout.splitlines()  # `-A`: every commit's experiments (here one commit)
    assert row in sh(repo, sys.executable, "scripts/seed_table.py", "--prefix", "other", "seeds").stdout.splitlines()
    assert f"| {exp['probe']:.1f} | {exp['probe rand']:.1f} | {exp['probe'] - exp['probe rand']:.2f} |" in row
    assert (repo / "metrics/linprobe.json").read_text() == before  # the workspace is left as it was
    protocols = [line for line in r.stdout.splitlines() if line.startswith("| ijepa | 1 |")][1]
    assert f"| {exp['attentive']:.1f} | {exp['attentive rand']:.1f} |" in protocols and exp["RankMe"] >= 1
    both = sh(repo, sys.executable, "scripts/seed_table.py", "--prefix", "seeds", "--workspace", "--view", "gate")
    assert [line[:13] for line in both.stdout.splitlines()[2:4]] == ["| ijepa | 0 |", "| ijepa | 1 |"]
    # the health monitor of that experiment drawn beside the workspace's
    sh(repo, sys.executable, "scripts/plot_monitor.py", "--exp", "seeds-ijepa-seed1", "--out", "monitor.png")
    assert (repo / "monitor.png").stat().st_size > 1000
    r = sh(repo, sys.executable, "scripts/plot_monitor.py", "--exp", "no-such-exp", check=False)
    assert r.returncode != 0 and "no DVC experiment named 'no-such-exp'" in r.stderr
    r = sh(repo, sys.executable, "scripts/seed_table.py", "--prefix", "nothing-such", check=False)
    assert r.returncode != 0 and "no experiment named nothing-such*" in r.stderr


def test_a_recipe_study_runs_its_grid_once_and_tabulates_time_and_results(repo):
    """make study: each variant an experiment (`single_item`: only linprobe, on the chain's upstream outputs);
    the base variant runs nothing and takes its times from the chain's record, the changed one's linprobe is
    timed as it runs."""
    (repo / "grid.yaml").write_text(
        "prefix: st\nstages: [linprobe]\nsingle_item: true\nvariants:\n  base: []\n  lp5: [linprobe.epochs=5]\n"
    )
    before = json.loads((repo / "outputs/stage_times.json").read_text())
    r = sh(repo, sys.executable, "scripts/recipe_study.py", "grid.yaml")
    assert "Running stage 'linprobe'" in r.stdout and "st-base-s0: dvc exp run" in r.stdout
    assert "-S linprobe.epochs=5 --single-item linprobe" in r.stdout
    after = json.loads((repo / "outputs/stage_times.json").read_text())
    assert [k.split(":")[0] for k in set(after) - set(before)] == ["linprobe"]  # only lp5's linprobe ran
    rows = {line.split(" | ")[0]: line.split(" | ") for line in r.stdout.splitlines() if line.startswith("| ")}
    assert set(rows) == {"| variant", "| base", "| lp5"}
    header = rows["| variant"]
    for variant in ("| base", "| lp5"):
        cells = dict(zip(header, rows[variant], strict=True))
        assert cells["seeds"] == "1" and float(cells["linear val"]) > 0 and float(cells["finetune s"]) > 0
    again = sh(repo, sys.executable, "scripts/recipe_study.py", "grid.yaml", "--table")
    assert "dvc exp run" not in again.stdout and again.stdout.splitlines()[-3:] == r.stdout.splitlines()[-3:]
    # the study's record (grid.runs.json, committed with the code): a clone has none of the experiments, and
    # prints the same table from the record and runs nothing again
    record = json.loads((repo / "grid.runs.json").read_text())["runs"]
    assert set(record) == {"st-base-s0", "st-lp5-s0"} and record["st-lp5-s0"]["stage_times"]["linprobe"] > 0
    assert record["st-lp5-s0"]["data"]["params"]["params.yaml"]["data"]["linprobe"]["epochs"] == 5
    sh(repo, "dvc", "exp", "remove", "st-base-s0", "st-lp5-s0")
    assert "st-" not in sh(repo, "dvc", "exp", "show", "--json").stdout
    cloned = sh(repo, sys.executable, "scripts/recipe_study.py", "grid.yaml")
    assert "st-base-s0: already run" in cloned.stdout and "dvc exp run" not in cloned.stdout
    assert cloned.stdout.splitlines()[-3:] == r.stdout.splitlines()[-3:]
    recorded = sh(repo, sys.executable, "scripts/recipe_study.py", "grid.yaml", "--record")
    assert "0 experiments recorded" in recorded.stdout  # nothing live to add; the record is kept as it was
    assert json.loads((repo / "grid.runs.json").read_text())["runs"] == record
    (repo / "grid.runs.json").write_text('{"runs": {"st-base-s0": {"rev": "abc"}}}')
    r = sh(repo, sys.executable, "scripts/recipe_study.py", "grid.yaml", "--table", check=False)
    assert r.returncode != 0 and "Traceback" not in r.stderr
    assert r.stderr.startswith("grid.runs.json: not a study record (KeyError")
    bad = repo / "bad.yaml"
    bad.write_text("variants:\n  x: [linprobe.epochs]\n")
    r = sh(repo, sys.executable, "scripts/recipe_study.py", "bad.yaml", check=False)
    assert r.returncode != 0 and "variants.x must be a list of key=value strings" in r.stderr
    bad.write_text("single_item: true\nvariants:\n  x: []\n")
    r = sh(repo, sys.executable, "scripts/recipe_study.py", "bad.yaml", check=False)
    assert r.returncode != 0 and r.stderr.strip() == "bad.yaml: single_item needs the stages to run"
    r = sh(repo, sys.executable, "scripts/recipe_study.py", "no-grid.yaml", check=False)
    assert r.returncode != 0 and r.stderr.strip() == "no-grid.yaml: no such grid file"
    bad.write_text("variants: [unclosed\n")
    r = sh(repo, sys.executable, "scripts/recipe_study.py", "bad.yaml", check=False)
    assert r.returncode != 0 and r.stderr.startswith("bad.yaml: not valid YAML (") and "Traceback" not in r.stderr


def test_queued_sweep_keeps_its_mlflow_artifacts(repo):
    """Two queued experiments run side by side (two workers) into the one sqlite store: both complete (each the
    pretrain stage, whose runs the assertions read)."""
    sh(repo, "dvc", "exp", "run", "--queue", "-S", "optim.lr=0.001,0.002", "pretrain")
    status = run_queue(repo, workers=2, timeout_s=400)
    assert status.count("Success") >= 2, status
    _, _, runs = mlflow_runs(repo, "tags.`ijepa.stage` = 'pretrain'")
    lrs = {r.data.params.get("optim.lr") for r in runs}
    assert {"0.001", "0.002"} <= lrs
    client = mlflow_runs(repo)[0]
    swept = [r for r in runs if r.data.params.get("optim.lr") in ("0.001", "0.002")]
    assert len(swept) == 2
    for r in swept:
        assert r.info.status == "FINISHED" and r.data.params["pretrain.epochs"]
        steps = int(r.data.metrics["steps"])
        history = client.get_metric_history(r.info.run_id, "loss")
        assert steps > 0 and sorted(m.step for m in history) == list(range(steps)), (steps, len(history))
        assert r.info.artifact_uri.startswith((repo / "mlruns").as_uri())  # not in DVC's deleted temp dir
        png = Path(r.info.artifact_uri.removeprefix("file://")) / "plots/pretrain_curves.png"
        assert png.is_file()


def test_bad_params_and_unreachable_store_fail_before_work(repo, tmp_path):
    work = tmp_path / "work"
    shutil.copytree(repo, work, ignore=shutil.ignore_patterns("mlflow.db", "mlruns", ".dvc"))
    shutil.rmtree(work / "models", ignore_errors=True)
    params = (work / "params.yaml").read_text()
    bad = yaml.safe_load(params)
    bad["optim"]["lr"] = -0.0005
    (work / "params.yaml").write_text(yaml.safe_dump(bad, sort_keys=False))
    r = sh(work, sys.executable, "-m", "stages.pretrain", check=False)
    assert r.returncode == 2 and "optim.lr: must be > 0, got -0.0005" in r.stderr
    (work / "params.yaml").write_text(params)
    (tmp_path / "a_file").write_text("not a directory")
    r = sh(
        work,
        sys.executable,
        "-m",
        "stages.pretrain",
        check=False,
        env={"MLFLOW_TRACKING_URI": f"sqlite:///{tmp_path}/a_file/mlflow.db"},
    )
    assert r.returncode == 2 and "MLflow tracking store sqlite:///" in r.stderr and "unreachable" in r.stderr
    assert not (work / "models/pretrain").exists()
