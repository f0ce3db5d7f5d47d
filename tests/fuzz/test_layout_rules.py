"""The rules for what a directory may hold, one case each (the fuzzer draws them at random too).

Without an index, a weights file may be a link: to a regular file it is read wherever that file is
(the user linked it in; the hub cache does the same); to a FIFO, a device, a folder, nothing, or
itself it is refused, naming the entry, instead of blocking or being skipped. An index's entries
must stay inside the index's folder (they are the checkpoint author's words, not the user's).
"""

from __future__ import annotations

import os
import shutil

import pytest
import torch
from safetensors.torch import load_file

import diffgen
from diffgen.errors import CheckpointError, LoadError

WEIGHTS = "diffusion_pytorch_model.safetensors"


@pytest.fixture
def flux(tmp_path, flux_dir):
    case = tmp_path / "transformer"
    shutil.copytree(flux_dir, case)
    return case


def test_a_link_to_a_regular_file_outside_is_read(flux, tmp_path):
    outside = tmp_path / "elsewhere" / "big.safetensors"
    outside.parent.mkdir()
    (flux / WEIGHTS).rename(outside)
    os.symlink(outside, flux / WEIGHTS)
    model = diffgen.load_transformer(flux, device="cpu", rewrites=False)
    want = load_file(outside)  # the safetensors library's read of the same bytes
    state = model.state_dict()
    assert set(want) == set(state) and all(torch.equal(state[k], want[k].float()) for k in want)


@pytest.mark.parametrize("target", ["fifo", "device", "directory", "nothing", "itself"])
def test_a_weights_entry_that_is_no_regular_file_is_refused(flux, tmp_path, target):
    entry = flux / WEIGHTS
    entry.unlink()
    if target == "fifo":
        os.mkfifo(entry)
    elif target == "device":
        os.symlink("/dev/zero", entry)
    elif target == "directory":
        os.symlink(tmp_path, entry)
    elif target == "nothing":
        os.symlink(tmp_path / "gone.safetensors", entry)
    else:
        os.symlink(WEIGHTS, entry)
    for call in (diffgen.inspect, diffgen.load_transformer):
        with pytest.raises(CheckpointError, match=WEIGHTS):
            call(flux, device="cpu")


def test_a_fifo_index_is_refused_not_skipped(tmp_path, flux_dir):
    # Shards beside a FIFO named as their index: skipping the index would load the listing instead.
    case = tmp_path / "transformer"
    shutil.copytree(flux_dir, case)
    os.mkfifo(case / f"{WEIGHTS}.index.json")
    with pytest.raises(CheckpointError, match="index.json.*not a regular file|not a regular file.*index.json"):
        diffgen.inspect(case, device="cpu")


def test_rope_axes_must_add_up_to_the_head_width(flux):
    import json

    config = json.loads((flux / "config.json").read_text())
    config["axes_dims_rope"] = [4, 4]
    (flux / "config.json").write_text(json.dumps(config))
    with pytest.raises(LoadError, match=r"axes_dims_rope=\[4, 4\] adds up to 8, but attention_head_dim is 16"):
        diffgen.inspect(flux, device="cpu")
