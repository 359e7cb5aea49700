"""run=analyse under torchrun (2 gloo CPU ranks): every rank ends with rank 0's metanetwork result.

On a GPU the metanetwork's scatter sums (``index_add_``, atomics) end in a different order on each rank, so each
rank's own application gives slightly different weights. The driver (written here) simulates that on the CPU: on
rank 1 the application is perturbed after the fact. It records every model each rank measures (the state dicts at
the MACs/accuracy step, where the all-reduced accuracy would mix the ranks' models); both ranks must hold rank 0's
unperturbed result, which is the single-process application.
"""
import json

import pytest
import torch

from generate_dataset.models import build_model, model_spec
from helpers import REPO, run_torchrun, save_tiny_metanetwork, tiny_cfg
from nn.apply import apply_saved_metanetwork
from stages.common import codec_options
from utils.checkpoint import save_checkpoint

pytestmark = pytest.mark.usefixtures("one_thread")

DRIVER = f'''
import json, logging, sys
sys.path.insert(0, {str(REPO)!r})
sys.path.insert(0, {str(REPO / "tests")!r})
import torch
from helpers import tiny_cfg
from stages import analyse
from utils.distributed import cleanup, init_distributed, rank

init_distributed("gloo", "cpu")
overrides, out = json.loads(sys.argv[1]), sys.argv[2]
real_apply, real_num_params = analyse.apply_saved_metanetwork, analyse.num_params


def apply(model, *args, **kwargs):
    result = real_apply(model, *args, **kwargs)
    if rank() == 1:  # as if this rank's GPU had summed in another order
        with torch.no_grad():
            for p in model.parameters():
                p.add_(1e-3 * torch.rand_like(p))
        torch.save(model.state_dict(), f"{{out}}/rank1_own.pt")
    return result


measured = []


def num_params(model):  # called once per analysed model, on every rank: record what this rank measures
    torch.save(model.state_dict(), f"{{out}}/rank{{rank()}}_{{len(measured)}}.pt")
    measured.append(1)
    return real_num_params(model)


analyse.apply_saved_metanetwork, analyse.num_params = apply, num_params
analyse._write_statistics = lambda models, run_dir, rank: ("stats.csv", "stats.png")  # no plot: not tested here
try:
    analyse.run(tiny_cfg(overrides), out)
finally:
    cleanup()
'''


@pytest.mark.slow
def test_every_rank_analyses_rank0s_metanetwork_result(tmp_path):
    torch.manual_seed(0)
    model = build_model("resnet8", 10, in_channels=1).eval()
    path = save_checkpoint(tmp_path / "model.pt", model.state_dict(), model_spec("resnet8", model, 10))
    mn = save_tiny_metanetwork(tmp_path / "mn.pt")
    overrides = ["run=analyse", f"final.model={path}", f"final.metanetwork={mn}", "final.analyse_evaluate=false"]
    driver = tmp_path / "analyse_ddp_driver.py"
    driver.write_text(DRIVER)
    proc = run_torchrun([json.dumps(overrides), str(tmp_path)], tmp_path, script=driver, timeout=120)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-4000:]

    # the reference: the metanetwork applied once, in this process
    expected = {k: v.clone() for k, v in model.state_dict().items()}
    applied = build_model("resnet8", 10, in_channels=1).eval()
    applied.load_state_dict(model.state_dict())
    apply_saved_metanetwork(applied, mn, map_location="cpu", **codec_options(tiny_cfg(overrides)))
    after = applied.state_dict()

    def load(name):
        return torch.load(tmp_path / name, weights_only=True)

    own = load("rank1_own.pt")  # rank 1's own (perturbed) application really differed
    assert any(not torch.equal(own[k], after[k]) for k in after)
    for r in (0, 1):
        plain, changed = load(f"rank{r}_0.pt"), load(f"rank{r}_1.pt")
        assert not (tmp_path / f"rank{r}_2.pt").exists()  # two models: the model and its metanetwork version
        for key, value in expected.items():
            assert torch.equal(plain[key], value), (r, key)
        for key, value in after.items():
            assert torch.equal(changed[key], value), (r, key)
