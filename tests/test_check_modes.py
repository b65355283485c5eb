"""Check modes: set_checks / the checks() context manager / LEANLOSS_CHECKS, and no value
checks while torch.compile traces."""
from __future__ import annotations

import os
import subprocess
import sys
import warnings

import pytest
import torch

import leanloss
from leanloss import _checks, _heuristics
from leanloss._checks import losses as loss_checks
from leanloss._checks import mode, primitives
from leanloss.errors import LeanlossValueError, TargetOutOfRangeError

X = torch.randn(4, 3)
T = torch.tensor([0, 1, 2, 1])
BAD_T = torch.tensor([0, 1, 2, 7])


def test_default_is_full_and_set_checks_returns_previous():
    assert leanloss.get_checks() == "full"
    assert leanloss.set_checks("shapes") == "full"
    assert leanloss.set_checks("off") == "shapes"
    assert leanloss.get_checks() == "off"


def test_unknown_mode_names_argument_and_choices():
    with pytest.raises(ValueError, match=r"'mode'.*'full', 'shapes', 'off'.*'fast'"):
        leanloss.set_checks("fast")
    assert leanloss.get_checks() == "full"


def test_context_manager_restores_on_exit_and_on_error():
    with leanloss.checks("off"):
        assert leanloss.get_checks() == "off"
        with leanloss.checks("shapes"):
            assert leanloss.get_checks() == "shapes"
        assert leanloss.get_checks() == "off"
    assert leanloss.get_checks() == "full"
    with pytest.raises(KeyError):
        with leanloss.checks("off"):
            raise KeyError("boom")
    assert leanloss.get_checks() == "full"


def test_full_checks_values():
    with pytest.raises(TargetOutOfRangeError):
        leanloss.cross_entropy(X, BAD_T)
    with pytest.warns(leanloss.InputWarning):
        leanloss.cross_entropy(X.softmax(1), T)


def test_shapes_mode_skips_value_checks_keeps_shape_checks():
    with leanloss.checks("shapes"), warnings.catch_warnings():
        warnings.simplefilter("error", leanloss.InputWarning)
        leanloss.cross_entropy(X.softmax(1), T)  # no heuristic
        leanloss.cosine_embedding_loss(X, X, torch.tensor([1.0, 0.0, 1.0, -1.0]))  # no value check
        with pytest.raises(LeanlossValueError, match="'weight'"):
            leanloss.cross_entropy(X, T, weight=torch.ones(2))
        with pytest.raises(LeanlossValueError, match="'target'"):
            leanloss.cross_entropy(X, T[:3])


def test_off_mode_runs_no_leanloss_check():
    with leanloss.checks("off"):
        assert not _checks.shapes_enabled() and not _checks.values_enabled()
        # a bad shape now fails (if at all) inside torch, not in leanloss's checks
        try:
            leanloss.cross_entropy(X, T, weight=torch.ones(2))
        except Exception as err:  # noqa: BLE001 - any torch error is fine, a leanloss one is not
            assert not isinstance(err, (_checks.LeanlossValueError, _checks.LeanlossTypeError)), err
        # values are not read: the right result on good inputs, equal to full mode
        off = leanloss.cross_entropy(X, T)
    assert torch.equal(off, leanloss.cross_entropy(X, T))


_PROBE = (
    "import leanloss, torch\n"
    "print(leanloss.get_checks())\n"
    "try:\n"
    "    leanloss.cosine_embedding_loss(torch.ones(2, 3), torch.ones(2, 3), torch.tensor([1.0, 0.0]))\n"
    "    print('value-check-skipped')\n"
    "except ValueError:\n"
    "    print('value-check-ran')\n"
)


def test_environment_variable_sets_the_mode_at_import():
    """One fresh interpreter (importing torch is the cost): the mode comes from the env."""
    env = dict(os.environ, LEANLOSS_CHECKS=" Shapes ")
    out = subprocess.run([sys.executable, "-c", _PROBE], env=env, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == ["shapes", "value-check-skipped"]


@pytest.mark.parametrize("env_value, expected", [(None, "full"), ("", "full"), ("OFF", "off"), ("shapes", "shapes")])
def test_environment_variable_values(monkeypatch, env_value, expected):
    if env_value is None:
        monkeypatch.delenv("LEANLOSS_CHECKS", raising=False)
    else:
        monkeypatch.setenv("LEANLOSS_CHECKS", env_value)
    assert mode._mode_from_env() == expected


def test_environment_variable_unknown_value(monkeypatch):
    monkeypatch.setenv("LEANLOSS_CHECKS", "everything")
    with pytest.raises(ValueError, match=r"LEANLOSS_CHECKS.*'full'.*'everything'"):
        mode._mode_from_env()


# ------------------------------------------------------------------------------------------
# torch.compile: value checks (device syncs, warnings) are skipped while tracing
# ------------------------------------------------------------------------------------------


def test_value_checks_skipped_under_torch_compile(monkeypatch):
    calls = []
    real_range = _heuristics._range
    real_first = primitives.first_position

    def counting_range(x):
        calls.append("range")
        return real_range(x)

    monkeypatch.setattr(_heuristics, "_range", counting_range)
    for module in (primitives, loss_checks):  # the value checks' failure path
        monkeypatch.setattr(module, "first_position", lambda m: calls.append("first") or real_first(m))

    def loss(x, t):
        return leanloss.cross_entropy(x, t, label_smoothing=0.1)

    probs = torch.randn(6, 5).softmax(1)  # eager mode warns on these
    target = torch.tensor([0, 1, 2, 3, 4, 0])
    torch._dynamo.reset()
    # fullgraph: a value check (bool(tensor), .item()) would be a graph break, i.e. an error here
    compiled = torch.compile(loss, backend="eager", fullgraph=True)
    with warnings.catch_warnings():
        warnings.simplefilter("error", leanloss.InputWarning)
        got = compiled(probs, target)
    assert calls == [], "value checks ran while compiling"
    with pytest.warns(leanloss.InputWarning):
        expected = loss(probs, target)
    assert calls, "the eager call must run the value checks (else this test proves nothing)"
    torch.testing.assert_close(got, expected, rtol=0, atol=0)
    torch._dynamo.reset()
