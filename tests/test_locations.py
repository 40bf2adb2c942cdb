"""No new ``os.path``/``open`` on a location a user may give as a gs:// or s3:// URI.

Every user-given location goes through ``vlp_jax.runtime.fs`` (docs/pods.md); ``os.path.join``
on ``gs://bucket/run`` makes a local folder named ``gs:`` and ``open`` on it fails deep inside a
library.  Modules that still call the local-file API do so on paths that are local by
construction (a staged copy, a temporary file, /proc, a library that only takes local files);
each is listed here with the reason and the number of such calls, so a new call — in any
module — fails this test until it is moved to ``fs`` or its reason is written down.
"""

import ast
import pathlib

ROOT = pathlib.Path(__file__).resolve().parent.parent
_LOCAL_CALLS = {"makedirs", "listdir", "replace", "remove", "rename", "unlink", "scandir",
                "walk", "rmtree", "move", "copy", "copyfile", "copytree", "glob", "mkdir",
                "stat", "statvfs"}

# module -> (calls, why they are local by construction)
LOCAL_BY_CONSTRUCTION = {
    "_tpu_host.py": (2, "probes /dev and /sys of this host"),
    "aot/__main__.py": (4, "AOT reports of a CPU compile box, written locally"),
    "aot/analysis.py": (1, "reads XLA's local dump"),
    "aot/report.py": (2, "local report files"),
    "config/overrides.py": (1, "config files are local Python modules"),
    "convert/hf_bert.py": (33, "the one-off converter CLI works on local folders; training "
                               "stages a converted folder on a store (model.text_init)"),
    "convert/hf_tokenizer.py": (11, "part of the converter CLI (local folders)"),
    "convert/hf_vision.py": (6, "reads the staged local copy of model.image_init"),
    "convert/pretrained.py": (3, "paths inside the staged local copy"),
    "convert/text_encoder.py": (7, "reads the staged local copy of model.text_init"),
    "data/build/beam_commit.py": (2, "local temp files uploaded through Beam FileSystems"),
    "data/build/beam_io.py": (18, "the local side of Beam FileSystems transfers"),
    "data/build/beam_pipeline.py": (1, "the driver's local temp folder"),
    "data/build/beam_stages.py": (5, "worker-local temp files"),
    "data/build/beam_write.py": (2, "worker-local shard files before upload"),
    "data/build/fingerprint.py": (2, "hashes local files"),
    "data/build/from_config.py": (6, "the local staging folder"),
    "data/build/tfds_builder.py": (8, "TFDS builds on local disk before publishing"),
    "data/catalog/generate.py": (33, "generates into a local folder; data.build.from_config "
                                     "uploads it when data.cache_dir is on a store"),
    "data/input/dataset_reader.py": (5, "opens the verified local copy of a build"),
    "data/shard_check.py": (3, "checks shards of the local copy"),
    "data/store_commit.py": (17, "the local build and its staged copy"),
    "data/tokenizer.py": (4, "tokenizers reads local folders (staged first)"),
    "experiments/ablate.py": (27, "the ablation harness runs its subprocesses on this machine"),
    "experiments/confirm.py": (9, "harness files on this machine"),
    "experiments/protocol.py": (6, "harness files on this machine"),
    "experiments/report.py": (9, "harness files on this machine"),
    "experiments/stamps.py": (10, "harness files on this machine"),
    "indexing/ann.py": (7, "faiss reads and writes local files only (staged / uploaded around it)"),
    "indexing/beam_embed.py": (5, "worker-local temp files"),
    "indexing/beam_index.py": (23, "faiss index files built locally, then uploaded"),
    "indexing/bundle.py": (9, "reads the staged local copy of a bundle"),
    "indexing/export.py": (21, "the bundle is written locally, then published"),
    "indexing/index.py": (22, "the index job works in a local folder, then publishes"),
    "indexing/index_files.py": (13, "local index files"),
    "indexing/item_embed.py": (3, "local chunk files of the index job"),
    "indexing/locations.py": (21, "stages and publishes serving files: the local side"),
    "indexing/update.py": (11, "the incremental update's local working folder"),
    "runtime/allocator.py": (4, "system libraries of this host"),
    "runtime/atomic_io.py": (4, "the local branch of an atomic write"),
    "runtime/devices.py": (2, "JAX's compilation cache is a local folder"),
    "runtime/fs.py": (8, "the local backend of the location layer itself"),
    "runtime/staging.py": (19, "writes the local copy"),
    "runtime/storage.py": (5, "free space of a local filesystem"),
    "runtime/uri.py": (4, "parses local paths"),
    "serve/assemble.py": (1, "/proc/self/task: this process's threads"),
    "serve/fleet.py": (1, "the workers' metric files: a local temporary folder"),
    "serve/item_table.py": (1, "the items file of the staged local copy of an index"),
    "serve/policy.py": (15, "the server's allowed roots are local folders (staged copies)"),
    "serve/search_index.py": (2, "faiss opens the staged local copy of an index"),
    "serve/service.py": (2, "the staged local index"),
    "serve/workers.py": (2, "a local control file of the worker processes"),
    "train/checkpointing.py": (1, "moves a local step aside (object stores copy instead)"),
    "train/metrics_log.py": (1, "appends to the local file or the local mirror"),
    "train/remote_mirror.py": (9, "the local mirror of an object-store workdir"),
    "train/workdir_lock.py": (2, "/proc and the local lock file"),
}


def _local_file_calls(path: pathlib.Path) -> int:
    count = 0
    for node in ast.walk(ast.parse(path.read_text())):
        if not isinstance(node, ast.Call):
            continue
        f = node.func
        if isinstance(f, ast.Name) and f.id == "open":
            count += 1
        elif isinstance(f, ast.Attribute):
            v = f.value
            if (isinstance(v, ast.Attribute) and isinstance(v.value, ast.Name)
                    and v.value.id == "os" and v.attr == "path"):
                count += 1
            elif (isinstance(v, ast.Name) and v.id in ("os", "shutil", "glob")
                  and f.attr in _LOCAL_CALLS):
                count += 1
    return count


def test_local_file_calls_only_where_paths_are_local_by_construction():
    package = ROOT / "vlp_jax"
    found = {str(p.relative_to(package)): _local_file_calls(p)
             for p in sorted(package.rglob("*.py"))}
    problems = []
    for module, count in found.items():
        allowed = LOCAL_BY_CONSTRUCTION.get(module, (0, ""))[0]
        if count > allowed:
            problems.append(f"vlp_jax/{module}: {count} os.path/open/shutil calls, {allowed} "
                            "allowed — use vlp_jax.runtime.fs for locations a user may give "
                            "as gs:// or s3://, or record why these paths are local")
    stale = [m for m in LOCAL_BY_CONSTRUCTION if found.get(m, 0) < LOCAL_BY_CONSTRUCTION[m][0]]
    assert problems == []
    assert stale == [], f"lower the recorded counts (fewer local calls now): {stale}"
