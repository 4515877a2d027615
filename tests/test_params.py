"""cdgfast.params: the one place that lists a model's trainable parameters and flattens them (SPEC section 1),
against naive references written here."""
import pytest
import torch

from cdgfast.models import build_unet
from cdgfast.params import (as_param_list, assign_grads_, flat_grads, flatten, flatten_detached, load_flat_,
                            require_trainable, split_like, trainable_named, trainable_parameters)


def _model():
    torch.manual_seed(0)
    m = torch.nn.Sequential(torch.nn.Linear(3, 5), torch.nn.Tanh(), torch.nn.Linear(5, 2))
    m[0].bias.requires_grad_(False)  # a frozen tensor in the middle: the flat order skips it
    return m


def test_flatten_and_split_round_trip():
    model = build_unet("tiny", num_classes=2, sample_size=8)
    params = as_param_list(model)
    flat = flatten(params)
    assert flat.numel() == sum(p.numel() for p in model.parameters() if p.requires_grad)
    for p, v in zip(params, split_like(flat, params)):
        assert torch.equal(p, v)
    with pytest.raises(ValueError, match="flat"):
        split_like(flat[:-1], params)


def test_listing_follows_the_spec_order_and_skips_frozen_tensors():
    m = _model()
    naive = [p for p in m.parameters() if p.requires_grad]
    names, params = trainable_named(m)
    assert names == ["0.weight", "2.weight", "2.bias"]
    assert all(a is b for a, b in zip(params, naive)) and len(params) == 3
    assert all(a is b for a, b in zip(require_trainable(m), naive))
    assert all(a is b for a, b in zip(trainable_parameters(m), naive))


def test_listing_refuses_what_has_no_flat_vector():
    frozen = torch.nn.Linear(2, 2).requires_grad_(False)
    assert trainable_parameters(frozen) == []
    with pytest.raises(ValueError, match="model: expected at least one trainable"):
        require_trainable(frozen)
    with pytest.raises(ValueError, match="model: expected a torch.nn.Module"):
        trainable_named([torch.zeros(2)])
    cplx = torch.nn.Module()
    cplx.w = torch.nn.Parameter(torch.zeros(2, dtype=torch.complex64))
    with pytest.raises(ValueError, match="real floating"):
        trainable_named(cplx)


def test_flat_grads_counts_a_missing_gradient_as_zero():
    m = _model()
    params = require_trainable(m)
    m(torch.randn(4, 3))[:, 0].sum().backward()  # 2.weight row 1 and 2.bias[1] get zeros, all exist
    params[2].grad = None                        # a missing one
    naive = torch.cat([params[0].grad.flatten(), params[1].grad.flatten(), torch.zeros(2)])
    assert torch.equal(flat_grads(params), naive)
    given = [torch.ones_like(p) for p in params[:2]] + [None]
    assert torch.equal(flat_grads(params, given), torch.cat([torch.ones(15), torch.ones(10), torch.zeros(2)]))
    with pytest.raises(ValueError, match="grads"):
        flat_grads(params, given[:2])


def test_write_back_round_trips():
    m = _model()
    params = require_trainable(m)
    flat = torch.arange(27, dtype=torch.float32)
    assign_grads_(params, flat)           # allocates missing .grad
    assert torch.equal(flat_grads(params), flat)
    assign_grads_(params, 2 * flat)       # and copies into existing ones
    assert torch.equal(flat_grads(params), 2 * flat)
    load_flat_(params, flat)
    assert torch.equal(flatten_detached(params), flat) and not flatten_detached(params).requires_grad


def test_a_view_that_forwards_to_a_module_is_listed_like_it():
    """The driver hands methods a view of its DistributedDataParallel module (attribute access reaches the
    bare module); listing its parameters must work as on the module itself."""
    m = _model()

    class View:
        def __getattr__(self, name):
            return getattr(m, name)

    assert trainable_named(View())[0] == trainable_named(m)[0]
    with pytest.raises(ValueError, match="model: expected a torch.nn.Module"):
        trainable_named(object())
