"""The model store: confinement of request paths, job folders, publishing by rename, listing."""
import os

import pytest

from internlm_core.store import PathError, Store, check_job_id, check_name


@pytest.fixture
def store(tmp_path):
    (tmp_path / "elsewhere").mkdir()
    (tmp_path / "elsewhere" / "secret").mkdir()
    (tmp_path / "extra" / "hf").mkdir(parents=True)
    return Store(tmp_path / "root", read_roots=[tmp_path / "extra"])


def test_layout(store):
    assert sorted(p.name for p in store.root.iterdir()) == ["datasets", "jobs", "models"]


def test_source_paths_are_confined(store, tmp_path):
    (store.root / "imports" / "hf").mkdir(parents=True)
    assert store.source_path("imports/hf") == store.root / "imports" / "hf"
    assert store.source_path(str(store.root / "imports" / "hf")) == store.root / "imports" / "hf"
    assert store.source_path(str(tmp_path / "extra" / "hf")) == tmp_path / "extra" / "hf"  # a read root
    with pytest.raises(PathError, match=r"'\.\.'"):
        store.source_path("imports/../../elsewhere/secret")
    with pytest.raises(PathError, match="outside the store's roots"):
        store.source_path(str(tmp_path / "elsewhere" / "secret"))
    with pytest.raises(PathError, match="outside the store's roots"):
        store.source_path("/etc")
    with pytest.raises(PathError, match="job's private folder"):
        store.source_path("jobs")
    with pytest.raises(FileNotFoundError, match="not found"):
        store.source_path("imports/missing")
    with pytest.raises(PathError):
        store.source_path("")


def test_symlink_escape_is_rejected(store, tmp_path):
    os.symlink(tmp_path / "elsewhere" / "secret", store.root / "link-out")
    with pytest.raises(PathError, match="symlink"):
        store.source_path("link-out")
    os.symlink(tmp_path / "elsewhere", store.root / "models" / "escape")
    with pytest.raises(PathError, match="symlink"):
        store.model_path("escape")
    # inside the roots: fine (not models/, which holds the escape above: see the test below)
    os.symlink(store.root / "datasets", store.root / "link-in")
    assert store.source_path("link-in") == store.root / "datasets"


@pytest.mark.parametrize("name", ["", ".", "..", ".hidden", "a/b", "../x", "/abs", "x" * 129, "a b", "a\x00",
                                  "model\n", "x" * 128 + "\n"])
def test_bad_names(name):
    with pytest.raises(PathError, match="not a valid store name"):
        check_name(name)


@pytest.mark.parametrize("job_id", ["", "a" * 65, "abc\n", "abc:lock", "a/b", "..", "-x", None])
def test_bad_job_ids(job_id):
    """A job id is a folder name and a Redis key suffix: a trailing newline or a ':' never passes."""
    with pytest.raises(PathError, match="invalid job id"):
        check_job_id(job_id)
    assert check_job_id("0123abcdef_x-y") == "0123abcdef_x-y"


def test_model_and_dataset_names(store):
    with pytest.raises(FileNotFoundError, match="model 'nope' not found"):
        store.model_path("nope")
    with pytest.raises(FileNotFoundError, match="dataset 'nope' not found"):
        store.dataset_path("nope")
    assert store.model_path("new", must_exist=False) == store.root / "models" / "new"
    with pytest.raises(PathError):
        store.item_path("jobs", "x")


def test_publish_is_one_rename_and_refuses_to_clobber(store):
    out = store.staging("job1")
    out.mkdir()
    (out / "config.json").write_text('{"format": "internlm-mindspore/1"}')
    dst = store.publish("job1", "models", "m")
    assert (dst / "config.json").is_file() and not out.exists()
    out.mkdir()
    (out / "config.json").write_text('{"format": "internlm-mindspore/1", "v": 2}')
    with pytest.raises(FileExistsError):
        store.publish("job1", "models", "m")
    assert '"v"' not in (dst / "config.json").read_text()  # the old model is untouched
    store.publish("job1", "models", "m", overwrite=True)
    assert '"v": 2' in (dst / "config.json").read_text()
    assert not (store.job_dir("job1") / "replaced").exists()
    store.discard("job1")
    assert not (store.root / "jobs" / "job1").exists()
    with pytest.raises(FileNotFoundError):
        store.publish("job1", "models", "other")
    with pytest.raises(PathError, match="invalid job id"):
        store.job_dir("../x")


def test_list_shows_only_published_items(store):
    (store.root / "models" / "m").mkdir()
    (store.root / "models" / "m" / "config.json").write_text('{"format": "internlm-mindspore/1"}')
    (store.root / "models" / "m" / "model.safetensors").write_bytes(b"x" * 100)
    (store.root / "models" / "a").mkdir()
    (store.root / "models" / "a" / "adapter_config.json").write_text("{}")
    (store.root / "models" / ".m.tmp-1234").mkdir()  # a temporary: never listed
    (store.root / "datasets" / "d").mkdir()
    listed = [(e.area, e.name, e.kind) for e in store.list()]
    assert listed == [("models", "a", "adapter"), ("models", "m", "model"), ("datasets", "d", "dataset")]
    assert [e.size_bytes for e in store.list("models") if e.name == "m"][0] > 100
    with pytest.raises(PathError):
        store.list("jobs")


def test_symlinks_inside_a_folder_are_checked(store, tmp_path):
    """A folder that is itself inside the roots may hold a symlink (a weights file, a tokenizer,
    a subfolder, at any depth) that leads out: using the folder is refused, naming that entry."""
    secret = tmp_path / "elsewhere" / "secret"
    (secret / "weights").write_bytes(b"not yours")
    imports = store.root / "imports"

    def folder(rel: str) -> "os.PathLike":
        path = store.root / rel
        path.mkdir(parents=True)
        (path / "config.json").write_text("{}")
        return path

    os.symlink(secret / "weights", folder("imports/hf") / "tokenizer.model")
    with pytest.raises(PathError, match=r"'imports/hf/tokenizer\.model' leads outside the store's roots"):
        store.source_path("imports/hf")
    os.symlink(secret / "weights", folder("models/m") / "model.safetensors")
    with pytest.raises(PathError, match=r"'models/m/model\.safetensors' leads outside the store's roots"):
        store.model_path("m")
    os.symlink(secret, folder("datasets/d") / "part")  # a symlinked subfolder
    with pytest.raises(PathError, match=r"'datasets/d/part' leads outside the store's roots"):
        store.dataset_path("d")
    # a subfolder linked inside the roots is walked too: what it holds may lead out
    os.symlink(secret / "weights", folder("imports/deep") / "w.safetensors")
    os.symlink(imports / "deep", folder("imports/hf2") / "inner")
    with pytest.raises(PathError, match=r"/imports/hf2/inner/w\.safetensors' leads outside"):
        store.source_path(str(imports / "hf2"))  # absolute paths are walked the same way
    os.symlink(store.job_dir("job1"), folder("imports/peek") / "other-job")
    with pytest.raises(PathError, match=r"'imports/peek/other-job' is inside a job's private folder"):
        store.source_path("imports/peek")

    # links that stay inside the roots are fine, and a link back up does not walk forever
    ok = folder("clean/ok")
    os.symlink(tmp_path / "extra" / "hf", ok / "from-read-root")
    os.symlink("..", ok / "up")
    os.symlink(".", ok / "loop")
    assert store.source_path("clean/ok") == ok
    # an output that does not exist yet is not walked, and neither is a single file
    assert store.model_path("new", must_exist=False) == store.root / "models" / "new"
    assert store.source_path("imports/hf/config.json") == imports / "hf" / "config.json"
