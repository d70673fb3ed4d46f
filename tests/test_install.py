"""The package as users install and run it: no top-level name of another package, the `melt` command and its
`python -m` forms, and what a transformers version the integration does not support says."""
import os
import shutil
import subprocess
import sys
import zipfile
from importlib import metadata

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def run(*args, cwd=ROOT, timeout=300):
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    return subprocess.run([sys.executable, *args], cwd=cwd, env=env, capture_output=True, text=True,
                          timeout=timeout)


def installed(name):
    try:
        return metadata.distribution(name)
    except metadata.PackageNotFoundError:
        return None


def test_no_regular_package_named_kernels_in_the_checkout():
    """The Triton folder stays `kernels/` but is never a regular package: that would shadow Hugging Face's
    `kernels` wherever the checkout's root is on sys.path (`python -m ...` from the checkout)."""
    assert os.path.isdir(os.path.join(ROOT, "kernels"))
    assert not os.path.exists(os.path.join(ROOT, "kernels", "__init__.py"))
    assert not os.path.exists(os.path.join(ROOT, "kernels.py"))
    done = run("-c", "import melt_kernels.kernels.fwd as m; print(m.__name__)")
    assert done.returncode == 0 and done.stdout.split() == ["melt_kernels.kernels.fwd"], \
        done.stderr


@pytest.mark.skipif(installed("kernels") is None, reason="Hugging Face's kernels package is not installed")
def test_hugging_face_kernels_resolves_to_itself_from_the_checkout():
    """From the checkout's root (on sys.path first, as with `python -m pytest`), `import kernels` is Hugging
    Face's, and transformers' model code (which imports it) loads."""
    done = run("-c", "import kernels, transformers.modeling_utils, melt_kernels; print(kernels.__file__)")
    assert done.returncode == 0, done.stderr
    found = done.stdout.strip()  # a namespace package (our folder, were it chosen) would print None
    assert found != "None" and os.path.dirname(os.path.abspath(found)) != os.path.join(ROOT, "kernels"), found


def test_the_wheel_has_no_top_level_kernels(tmp_path):
    """The built wheel holds the Triton sources under melt_kernels/kernels/ only, and, installed on its own,
    imports them from there."""
    pytest.importorskip("setuptools")
    # Built from a copy: setuptools writes build/ and *.egg-info into the tree it builds, and CI runs two suites
    # of this checkout side by side.
    source = tmp_path / "source"
    shutil.copytree(ROOT, source, ignore=shutil.ignore_patterns(".venv*", ".git", "build", "*.egg-info", "runs",
                                                                "__pycache__", ".hypothesis", ".pytest_cache"))
    done = subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation", "-w",
                           str(tmp_path), str(source)], capture_output=True, text=True, timeout=300,
                          env={**os.environ, "MELT_BUILD_CUDA": "0"})
    assert done.returncode == 0, done.stderr
    (wheel,) = tmp_path.glob("*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    tops = {name.split("/")[0] for name in names if not name.split("/")[0].endswith((".dist-info", ".data"))}
    assert tops == {"melt_kernels"}, tops
    assert "melt_kernels/kernels/fwd.py" in names
    sources = {os.path.relpath(os.path.join(folder, f), source).replace(os.sep, "/")
               for folder, _, files in os.walk(os.path.join(source, "melt_kernels")) for f in files if f.endswith(".py")}
    assert sources <= set(names), sorted(sources - set(names))  # every module of the package, subpackages too
    zipfile.ZipFile(wheel).extractall(tmp_path / "site")
    check = "import melt_kernels.kernels.launch as m; print(m.__file__)"
    done = run("-c", f"import sys; sys.path.insert(0, {str(tmp_path / 'site')!r}); {check}", cwd=tmp_path)
    assert done.returncode == 0 and done.stdout.strip().startswith(str(tmp_path / "site")), done.stderr


@pytest.mark.parametrize("command", [["-m", "melt_kernels"], ["-m", "melt_kernels.ouro"]])
def test_convert_runs_as_python_m_without_warnings(command, tmp_path):
    """`python -m melt_kernels convert` and `python -m melt_kernels.ouro convert` print no RuntimeWarning
    (runpy's "found in sys.modules" one among them: -W error would turn it into a failure)."""
    from ouro_reference import random_weights, tensor_shapes, tiny_config, write_checkpoint

    config = tiny_config(eos_token_id=None)
    write_checkpoint(tmp_path / "ouro", config, random_weights(tensor_shapes(config), seed=3))
    done = run("-W", "error", *command, "convert", str(tmp_path / "ouro"), str(tmp_path / "out"),
               "--device", "cpu", "--prompt-ids", "1 2 3", "--new-tokens", "2")
    assert done.returncode == 0, done.stderr
    assert "Warning" not in done.stderr and "generated (2 tokens" in done.stdout, done.stderr
    assert os.path.exists(tmp_path / "out" / "model.safetensors")


def test_melt_console_script_names_its_subcommands():
    """The installed `melt` script (pyproject's [project.scripts]) dispatches to each module's own parser."""
    script = os.path.join(os.path.dirname(sys.executable), "melt")
    if not os.path.exists(script):
        pytest.skip("the package is not installed with its console scripts in this environment")
    done = subprocess.run([script, "--help"], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0 and "convert" in done.stdout and "train" in done.stdout, done.stderr
    for command, option in (("convert", "--gate"), ("train", "--teacher")):
        done = subprocess.run([script, command, "--help"], capture_output=True, text=True, timeout=120)
        assert done.returncode == 0 and f"usage: melt {command}" in done.stdout and option in done.stdout


def test_unsupported_transformers_message_names_versions_and_the_other_path():
    from melt_kernels.hf_support import SUPPORTED, is_supported, unsupported_message

    message = unsupported_message("4.54.1")
    assert "4.54.1" in message and SUPPORTED in message and "load_ouro" in message and "generate" in message
    assert not is_supported("4.54.1") and is_supported("5.25.0") and not is_supported("6.0.0")


transformers = pytest.importorskip("transformers")


@pytest.mark.skipif(transformers.__version__.startswith("5."), reason="transformers 5 is supported (test_hf.py)")
@pytest.mark.parametrize("imports", ["melt_kernels, transformers", "transformers"])
def test_transformers_4_refuses_with_what_to_do(imports, tmp_path):
    """transformers 4.x (Ouro's cards pin 4.54.1): loading a MELT checkpoint, with melt_kernels imported or only
    through the checkpoint's auto_map (trust_remote_code), fails with the message that names the installed
    version, the one needed and the transformers-free path, instead of "model type melt not recognized"."""
    from ouro_reference import random_weights, tensor_shapes, tiny_config, write_checkpoint

    import melt_kernels

    config = tiny_config(eos_token_id=None)
    write_checkpoint(tmp_path / "ouro", config, random_weights(tensor_shapes(config), seed=4))
    melt_kernels.to_melt(melt_kernels.load_ouro(tmp_path / "ouro"), "latent").save_pretrained(tmp_path / "melt")
    remote = imports == "transformers"
    check = (f"import sys, {imports}\n"
             "try:\n"
             f"    transformers.AutoModelForCausalLM.from_pretrained(sys.argv[1], trust_remote_code={remote})\n"
             "except Exception as e:\n"
             "    print(type(e).__name__, e)\n")
    done = run("-c", check, str(tmp_path / "melt"), cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    assert transformers.__version__ in done.stdout and ">=5,<6" in done.stdout and "load_ouro" in done.stdout, \
        done.stdout
