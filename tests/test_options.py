"""utils/options.py (the engine) and runners/train_options.py (the training schema): the
shipped option files, `//` comments, overrides and validation."""
import json
import os
import subprocess
import sys

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import main_train_fbcnn
from runners.train_options import SCHEMA, load_options, options_reference_markdown, validate
from utils.errors import UserError
from utils.options import (Section, all_paths, apply_overrides, parse_json_with_comments,
                           parse_override)

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
OPTION_FILES = {name: os.path.join(ROOT, "options", f"train_fbcnn_{name}.json")
                for name in ("color", "gray", "graydouble")}


def _raw(name="color"):
    with open(OPTION_FILES[name], encoding="utf-8") as f:
        return parse_json_with_comments(f.read(), OPTION_FILES[name])


def _minimal(tmp_path):
    train = tmp_path / "train"
    train.mkdir(exist_ok=True)
    return {"task": "t", "datasets": {"train": {"dataset_type": "jpeg",
                                                "dataroot_H": str(train)}}}


@pytest.mark.parametrize("name,dataset_type,in_nc", [("color", "jpeg", 3),
                                                     ("gray", "jpeggray", 1),
                                                     ("graydouble", "jpeggraydouble", 1)])
def test_shipped_option_files_load_unchanged_with_spec_values(name, dataset_type, in_nc):
    opt = load_options(OPTION_FILES[name], check_paths=False)
    train_set, net, train = opt["datasets"]["train"], opt["netG"], opt["train"]
    assert train_set["dataset_type"] == dataset_type
    assert (net["in_nc"], net["out_nc"], opt["n_channels"]) == (in_nc, in_nc, 3)
    assert (train_set["H_size"], train_set["dataloader_batch_size"],
            train_set["dataloader_num_workers"]) == (96, 128, 16)
    assert (net["nc"], net["nb"], net["act_mode"], net["init_type"], net["init_bn_type"],
            net["init_gain"]) == ([64, 128, 256, 512], 4, "BR", "orthogonal", "uniform", 0.2)
    assert ((train["G_optimizer_lr"], train["QF_lossfn_weight"], train["G_scheduler_gamma"]) ==
            (2e-5, 0.001, 0.5))
    assert train["G_scheduler_milestones"] == [200000, 400000, 1200000, 1600000, 1800000]
    assert ((train["checkpoint_test"], train["checkpoint_save"], train["checkpoint_print"]) ==
            (2500, 5000, 500))
    assert opt["datasets"]["test"]["dataset_type"] == "jpeg"  # gray nets: follows in_nc instead
    assert train["total_iter"] is None and train["precision"] == "fp32"


def _with(raw, **train):
    raw["train"].update(train)
    return raw


def test_comment_markers_inside_strings_are_kept():
    text = '{"url": "http://example.com//x", // a comment\n "q": "a \\" // b"} // end'
    assert parse_json_with_comments(text) == {"url": "http://example.com//x", "q": 'a " // b'}


@settings(max_examples=60, deadline=None)
@given(st.dictionaries(st.text(max_size=8), st.one_of(st.text(max_size=12), st.integers()),
                       max_size=5))
def test_comments_never_change_the_data(data):
    lines = json.dumps(data, indent=1).split("\n")
    commented = "\n".join(line + "  // note: \"quoted\" // and more" for line in lines)
    assert parse_json_with_comments(commented) == data


def test_invalid_json_names_file_line_and_column():
    with pytest.raises(UserError, match=r"x\.json: invalid JSON at line 3 column"):
        parse_json_with_comments('{\n  "a": 1 // ok\n  "b": 2\n}', "x.json")


def test_duplicate_keys_are_errors():
    with pytest.raises(UserError, match="'a' appears twice"):
        parse_json_with_comments('{"a": 1, "a": 2}')


def test_unknown_key_names_dotted_path_and_nearest_valid_key():
    raw = _raw()
    raw["train"]["totl_iter"] = 10
    with pytest.raises(UserError) as err:
        validate(raw, "opts.json", check_paths=False)
    assert str(err.value) == ("opts.json: train.totl_iter: unknown key 'train.totl_iter'; "
                              "did you mean 'train.total_iter'?")


def test_misplaced_key_is_found_in_another_section():
    raw = _raw()
    raw["H_size"] = 64
    with pytest.raises(UserError, match="did you mean 'datasets.train.H_size'"):
        validate(raw, check_paths=False)


@pytest.mark.parametrize("where, name, meant", [
    ((), "checkpoint_save", "train.checkpoint_save"),  # not its neighbour checkpoint_test
    ((), "checkpoint_keep", "train.checkpoint_keep"),
    ((), "G_optimizer_lr", "train.G_optimizer_lr"),  # not G_optimizer_type
    (("train",), "checkpoint_sav", "train.checkpoint_save"),
    (("netG",), "H_size", "datasets.train.H_size"),
    ((), "chekpoint_save", "train.checkpoint_save"),  # misspelt and misplaced
])
def test_suggestion_is_the_likeliest_key(where, name, meant):
    raw = _raw()
    section = raw
    for key in where:
        section = section[key]
    section[name] = 1
    with pytest.raises(UserError, match=f"did you mean '{meant}'"):
        validate(raw, check_paths=False)


@pytest.mark.parametrize("key,value,message", [
    ("datasets.train.H_size", "96", r"datasets\.train\.H_size: expected an integer"),
    ("datasets.train.H_size", -8, r"datasets\.train\.H_size: must be >= 1, got -8"),
    ("netG.nb", True, r"netG\.nb: expected an integer, got true"),
    ("netG.nc", [64, 128], r"netG\.nc: expected a list of 4 integers"),
    ("train.G_optimizer_lr", 0, r"train\.G_optimizer_lr: must be > 0"),
    ("train.precision", "fp64",
     r'train\.precision: "fp64" is not one of "fp32", "tf32", "bf16", "fp16"'),
    ("train.G_scheduler_milestones", [5, 3], r"increasing order"),
    ("train.G_scheduler_type", "CosineAnnealingLR", r"until train\.total_iter, which is null"),
    ("datasets.train.dataset_type", "jpg", r"unknown dataset type 'jpg'; did you mean 'jpeg'\? "
                                           r"known: jpeg, jpeggray, jpeggraydouble, jpegdouble"),
    ("netG.net_type", "unet", r"unknown network type 'unet'; known: fbcnn"),
    ("netG.in_nc", 1, r"netG\.in_nc: dataset type 'jpeg' yields 3-channel patches"),
    ("datasets.train.qf_range", [90, 10], r"qf_range: \[low, high\] with low <= high"),
    ("datasets.train.qf_range", [5, 101], r"qf_range\[1\]: must be <= 100"),
    ("datasets.train.identity_prob", 1.5, r"identity_prob: must be <= 1"),
    ("datasets.train.samplings", ["444", "411"],
     r'samplings\[1\]: "411" is not one of "444", "422", "420"'),
    ("datasets.train.double_prob", 0.3, r"dataset type 'jpeg' is single JPEG; choose a double "
                                        r"type \(jpeggraydouble, jpegdouble\)"),
    ("merge_bn", True, None),
])
def test_wrong_values_name_the_key(key, value, message):
    raw = _raw()
    touched = apply_overrides(raw, [f"{key}={json.dumps(value)}"])
    if message is None:  # merge_bn with act_mode BR and a start point is valid
        assert validate(raw, check_paths=False, overridden=touched)["merge_bn"] is True
        return
    with pytest.raises(UserError, match=message) as err:
        validate(raw, "o.json", overridden=touched, check_paths=False)
    assert str(err.value).startswith(f"--set {key}")


def test_missing_required_key_and_missing_folder(tmp_path):
    raw = _minimal(tmp_path)
    del raw["datasets"]["train"]["dataset_type"]
    with pytest.raises(UserError, match=r"f\.json: datasets\.train\.dataset_type: missing "):
        validate(raw, "f.json")
    raw = _minimal(tmp_path)
    raw["datasets"]["train"]["dataroot_H"] = str(tmp_path / "nowhere")
    with pytest.raises(UserError, match=r"dataroot_H: training folder .*nowhere' does not exist"):
        validate(raw, "f.json")
    raw = _minimal(tmp_path)
    raw["datasets"]["test"] = {"dataroot_H": str(tmp_path / "no_test")}
    with pytest.raises(UserError, match=r"datasets\.test\.dataroot_H: test folder"):
        validate(raw, "f.json")


def test_batch_size_must_divide_among_processes(tmp_path):
    raw = _minimal(tmp_path)
    raw["datasets"]["train"]["dataloader_batch_size"] = 6
    assert validate(raw, world_size=3)["datasets"]["train"]["dataloader_batch_size"] == 6
    with pytest.raises(UserError, match="6 is not divisible by the 4 training processes"):
        validate(raw, world_size=4)


def test_defaults_fill_every_missing_key(tmp_path):
    opt = validate(_minimal(tmp_path))
    assert opt["train"]["total_iter"] is None and opt["train"]["manual_seed"] is None
    assert opt["datasets"]["test"] is None  # optional section: no validation
    assert opt["netG"]["act_mode"] == "R" and opt["path"]["root"] == "deblocking"
    for path, spec in all_paths(SCHEMA):
        if isinstance(spec, Section) or path.startswith("datasets.test."):
            continue
        node = opt
        for part in path.split("."):
            assert part in node, path
            node = node[part]


def test_gray_net_validates_on_gray_reads_of_a_jpeg_test_entry(tmp_path):
    raw = _minimal(tmp_path)
    raw["datasets"]["train"]["dataset_type"] = "jpeggray"
    raw["netG"] = {"in_nc": 1, "out_nc": 1}
    raw["datasets"]["test"] = {"dataset_type": "jpeg", "dataroot_H": str(tmp_path)}
    opt = validate(raw)
    assert opt["datasets"]["test"]["qf"] == 10 and opt["netG"]["in_nc"] == 1


def test_a_skip_gate_without_the_global_skip_is_refused(tmp_path):
    raw = _minimal(tmp_path)
    raw["netG"] = {"skip_gate": True}
    with pytest.raises(UserError, match=r"netG.skip_gate: gates the global skip, so it needs "
                                        r"netG.global_skip true"):
        validate(raw)
    raw["netG"]["global_skip"] = True
    assert validate(raw)["netG"]["skip_gate"]


def test_override_values_are_json_or_strings():
    assert parse_override("train.total_iter=10") == (["train", "total_iter"], 10)
    assert parse_override("netG.nc=[8,16,32,64]") == (["netG", "nc"], [8, 16, 32, 64])
    assert parse_override("path.root=runs/a=b") == (["path", "root"], "runs/a=b")
    assert parse_override("path.pretrained_netG=null") == (["path", "pretrained_netG"], None)
    with pytest.raises(UserError, match="expected dotted.key=value"):
        parse_override("train.total_iter")


def test_an_unknown_section_made_by_an_override_names_the_override(tmp_path):
    raw = _minimal(tmp_path)
    touched = apply_overrides(raw, ["foo.bar=1"])
    with pytest.raises(UserError, match=r"^--set foo: unknown key 'foo'"):
        validate(raw, "o.json", overridden=touched, check_paths=False)


def test_override_into_a_non_object_is_an_error():
    with pytest.raises(UserError, match="task is not an object"):
        apply_overrides({"task": "x"}, ["task.name=1"])


def test_main_reports_one_line_and_exit_status_2(capsys):
    status = main_train_fbcnn.main(["-opt", OPTION_FILES["gray"], "--set", "netG.nb=0"])
    err = capsys.readouterr().err
    assert status == 2
    assert err == "error: --set netG.nb: must be >= 1, got 0\n"


def test_docs_list_every_option():
    with open(os.path.join(ROOT, "docs", "training.md"), encoding="utf-8") as f:
        docs = f.read()
    missing = [path for path, spec in all_paths(SCHEMA)
               if not isinstance(spec, Section) and f"`{path}`" not in docs]
    assert not missing


@pytest.mark.parametrize("key,value,message", [
    ("datasets.train.H_size", 0, r"must be >= 1, got 0"),
    ("datasets.train.H_size", 96.5, r"expected an integer, got 96\.5"),
    ("datasets.train.dataloader_batch_size", -4, r"must be >= 1, got -4"),
    ("datasets.train.dataloader_num_workers", -1, r"must be >= 0, got -1"),
    ("datasets.train.dataloader_prefetch_factor", 0, r"must be >= 1, got 0"),
    ("datasets.train.dataloader_shuffle", "true", r'expected true or false, got "true"'),
    ("datasets.train.dataroot_H", ["a"], r'expected a string, got \["a"\]'),
    ("datasets.train.dataroot_H", None, r"expected a string, got null"),
    ("datasets.test.qf", 101, r"must be <= 100, got 101"),
    ("gpu_ids", [-1], r"gpu_ids\[0\]: must be >= 0, got -1"),
    ("netG.nc", [8, -16, 32, 64], r"netG\.nc\[1\]: must be >= 1, got -16"),
    ("netG.nc", "64", r"expected a list of 4 integers"),
    ("merge_bn_startpoint", 0, r"must be >= 1, got 0"),
    ("train.checkpoint_save", 0, r"must be >= 1, got 0"),
    ("train.checkpoint_print", -1, r"must be >= 1, got -1"),
    ("train.checkpoint_keep", 0, r"must be >= 1, got 0"),
    ("train.total_iter", -5, r"must be >= 1, got -5"),
    ("train.manual_seed", -1, r"must be >= 0, got -1"),
    ("train.max_nonfinite_steps", 0, r"must be >= 1, got 0"),
    ("train.G_optimizer_lr", -1e-4, r"must be > 0, got -0\.0001"),
    ("train.G_optimizer_betas", [0.9, 1.0], r"each beta must be < 1"),
    ("train.G_optimizer_lr", float("nan"), r"must be a finite number, got nan"),
    ("train.QF_lossfn_weight", float("inf"), r"must be a finite number, got inf"),
    ("netG.init_gain", float("-inf"), r"must be a finite number, got -inf"),
    ("train.manual_seed", 2 ** 64, r"must be <= 4294967295"),
    ("task", "", r"'' is not a folder name"),
    ("task", "runs/a", r"'runs/a' is not a folder name"),
    ("train", 5, r"train: expected an object, got 5"),
    ("netG", [], r"netG: expected an object, got \[\]"),
])
def test_every_invalid_value_names_its_key(key, value, message):
    raw = _raw()
    touched = apply_overrides(raw, [f"{key}={json.dumps(value)}"])
    with pytest.raises(UserError, match=message) as err:
        validate(raw, "o.json", overridden=touched, check_paths=False)
    assert str(err.value).startswith(f"--set {key}")
    assert "\n" not in str(err.value)


def test_every_schema_key_rejects_a_wrong_type():
    """Each option, given a value of a type it cannot take, is refused naming that option."""
    wrong = {"str": 1, "int": "1", "float": "x", "bool": 1, "list_int": {"a": 1},
             "list_float": "x", "list_str": "444"}
    for path, spec in all_paths(SCHEMA):
        if isinstance(spec, Section):
            continue
        raw = _raw()
        touched = apply_overrides(raw, [f"{path}={json.dumps(wrong[spec.kind])}"])
        with pytest.raises(UserError) as err:
            validate(raw, "o.json", overridden=touched, check_paths=False)
        assert str(err.value).startswith(f"--set {path}: expected "), path


def test_option_file_problems_are_one_line(tmp_path):
    with pytest.raises(UserError, match=r"nowhere\.json: cannot read option file \(No such file"):
        load_options(str(tmp_path / "nowhere.json"))
    (tmp_path / "list.json").write_text("[1, 2]")
    with pytest.raises(UserError, match=r"list\.json: expected a JSON object at the top level"):
        load_options(str(tmp_path / "list.json"))
    (tmp_path / "latin1.json").write_bytes(b'{"task": "caf\xe9"}')
    with pytest.raises(UserError, match=r"latin1\.json: not a UTF-8 text file \(byte 13\)"):
        load_options(str(tmp_path / "latin1.json"))
    nan = _minimal(tmp_path)
    nan["train"] = {"G_optimizer_lr": float("nan")}
    (tmp_path / "nan.json").write_text(json.dumps(nan))  # Python writes NaN, and reads it back
    with pytest.raises(UserError, match=r"nan\.json: train\.G_optimizer_lr: must be a finite"):
        load_options(str(tmp_path / "nan.json"))


def _bad_option_files(tmp_path):
    unknown = _minimal(tmp_path)
    unknown["train"] = {"totl_iter": 5}
    broken = json.dumps(_minimal(tmp_path))[:-3]
    missing_data = _minimal(tmp_path)
    missing_data["datasets"]["train"]["dataroot_H"] = str(tmp_path / "no_images")
    files = {"unknown.json": json.dumps(unknown), "broken.json": broken,
             "missing_data.json": json.dumps(missing_data)}
    for name, text in files.items():
        (tmp_path / name).write_text(text)
    return {
        "unknown.json": "unknown.json: train.totl_iter: unknown key 'train.totl_iter'; did you "
                        "mean 'train.total_iter'?",
        "broken.json": "broken.json: invalid JSON at line 1 column",
        "missing_data.json": "missing_data.json: datasets.train.dataroot_H: training folder",
        "absent.json": "absent.json: cannot read option file (No such file or directory)",
    }


def test_train_main_reports_each_bad_option_file_in_one_line(tmp_path, capsys):
    for name, message in _bad_option_files(tmp_path).items():
        status = main_train_fbcnn.main(["-opt", str(tmp_path / name), "--set",
                                        f"path.root={tmp_path / 'runs'}"])
        captured = capsys.readouterr()
        lines = captured.err.splitlines()
        assert status == 2 and len(lines) == 1 and lines[0].startswith("error: "), name
        assert message in lines[0] and captured.out == "", name
    assert not (tmp_path / "runs").exists()  # nothing was started


def test_train_script_prints_one_error_line_and_exits_2(tmp_path):
    """The real command line, in a fresh process: no traceback, nothing written."""
    message = _bad_option_files(tmp_path)["unknown.json"]
    (tmp_path / "bad.json").write_text((tmp_path / "unknown.json").read_text())
    out = subprocess.run([sys.executable, os.path.join(ROOT, "main_train_fbcnn.py"), "-opt",
                          "bad.json", "--set", f"path.root={tmp_path / 'runs'}"], cwd=tmp_path,
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 2 and out.stdout == ""
    assert out.stderr == "error: " + message.replace("unknown.json", "bad.json") + "\n"
    assert not (tmp_path / "runs").exists()


def test_docs_training_holds_the_options_reference_as_printed():
    with open(os.path.join(ROOT, "docs", "training.md"), encoding="utf-8") as f:
        doc = f.read()
    assert options_reference_markdown() in doc, (
        "docs/training.md is out of date: paste the output of `python -m runners.train_options`")


def test_every_problem_of_an_option_file_is_reported_at_once(tmp_path, capsys):
    """Two misspelt keys and a bad value: all three named, each with its hint, in one run."""
    raw = _raw()
    raw["train"]["G_optimiser_lr"] = raw["train"].pop("G_optimizer_lr")
    raw["train"]["total_iters"] = 10
    raw["netG"]["nb"] = 0
    path = tmp_path / "o.json"
    path.write_text(json.dumps(raw))
    assert main_train_fbcnn.main(["-opt", str(path)]) == 2
    lines = capsys.readouterr().err.splitlines()
    assert len(lines) == 3 and all(line.startswith(f"error: {path}: ") for line in lines)
    assert "unknown key 'train.G_optimiser_lr'; did you mean 'train.G_optimizer_lr'?" in lines[1]
    assert "unknown key 'train.total_iters'; did you mean 'train.total_iter'?" in lines[2]
    assert lines[0].endswith("netG.nb: must be >= 1, got 0")
