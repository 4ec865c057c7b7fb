"""GlobalBatchNorm (coreg_ray.coreg.sync_bn): two gloo ranks holding half a batch each get the
outputs, gradients and running statistics one process gets from plain BatchNorm on the whole."""
import copy

import pytest
import torch
from torch import nn

from coreg_ray.coreg.sync_bn import GlobalBatchNorm, convert_global_batchnorm
from tests.conftest import run_gloo_ranks


def _net():
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(),
                         nn.Flatten(), nn.Linear(4 * 36, 5), nn.BatchNorm1d(5))


def _batch():
    g = torch.Generator().manual_seed(1)
    return torch.randn(10, 3, 6, 6, generator=g) * 3 + 2, torch.randn(10, 5, generator=g)


def _one_process():
    net = _net().train()
    x, t = _batch()
    x.requires_grad_(True)
    for _ in range(2):  # two steps: the running statistics move twice
        y = net(x)
    ((y - t) ** 2).sum().backward()
    return y.detach(), x.grad, {k: v.grad for k, v in net.named_parameters()}, net.state_dict()


def _rank(rank, store, out):
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=2)
    group = dist.new_group()
    net = copy.deepcopy(convert_global_batchnorm(_net(), group)).train()  # as the key nets
    assert sum(isinstance(m, GlobalBatchNorm) for m in net.modules()) == 2
    x, t = _batch()
    rows = slice(0, 4) if rank == 0 else slice(4, 10)  # uneven halves: counts are summed
    x = x[rows].clone().requires_grad_(True)
    for _ in range(2):
        y = net(x)
    ((y - t[rows]) ** 2).sum().backward()  # the sum over both ranks' rows = one process's loss
    grads = {k: v.grad.clone() for k, v in net.named_parameters()}
    for g in grads.values():  # parameter gradients: summed over ranks (DDP would average)
        dist.all_reduce(g)
    torch.save((y.detach(), x.grad, grads, net.state_dict()), f"{out}/rank{rank}.pt")
    dist.destroy_process_group()


@pytest.mark.slow
def test_two_ranks_equal_one_process_batchnorm(tmp_path):
    run_gloo_ranks(_rank, tmp_path, timeout=120)
    y, xg, grads, sd = _one_process()
    parts = [torch.load(tmp_path / f"rank{r}.pt", weights_only=False) for r in range(2)]
    torch.testing.assert_close(torch.cat([p[0] for p in parts]), y, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(torch.cat([p[1] for p in parts]), xg, rtol=1e-4, atol=1e-5)
    for r in range(2):
        for k, g in grads.items():
            torch.testing.assert_close(parts[r][2][k], g, rtol=1e-4, atol=1e-4)
        for k, v in sd.items():  # running statistics: every rank's = one process's
            torch.testing.assert_close(parts[r][3][k].float(), v.float(), rtol=1e-5, atol=1e-6)


def test_conversion_keeps_weights_buffers_and_state_dict_keys():
    net = _net()
    net[1].running_mean.fill_(0.5)
    before = {k: v.clone() for k, v in net.state_dict().items()}
    conv = convert_global_batchnorm(net)
    assert isinstance(conv[1], GlobalBatchNorm) and isinstance(conv[5], GlobalBatchNorm)
    after = conv.state_dict()
    assert list(after) == list(before)
    assert all(torch.equal(after[k], before[k]) for k in before)
    x, _ = _batch()
    conv.eval()
    torch.testing.assert_close(conv(x), _eval_reference(before, x))  # eval: plain BatchNorm


def _eval_reference(sd, x):
    ref = _net().eval()
    ref.load_state_dict(sd)
    return ref(x)
