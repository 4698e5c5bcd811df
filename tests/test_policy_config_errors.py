"""``PolicyConfig``'s value errors carry the option they are about (``OptionError.option``), so a trainer profile
names its own config fields behind an option without reading the message."""
import math
import pickle
import re

import numpy as np
import pytest

from fastalign import PolicyConfig, PolicyLoss
from fastalign.policy_config import OptionError

# (options, the option named); every check of PolicyConfig.__post_init__ that raises a ValueError
CASES = [
    (dict(loss_type="nope"), "loss_type"), (dict(agg="x"), "agg"), (dict(loss_type="gmpo", agg="token-mean"), "agg"),
    (dict(seq_count="x"), "seq_count"), (dict(agg="token-mean", seq_count="all"), "seq_count"),
    (dict(importance_sampling_level="x"), "importance_sampling_level"),
    (dict(loss_type="gspo", importance_sampling_level="sequence"), "importance_sampling_level"),
    (dict(loss_type="reinforce", eps_low=0.1), "eps_low"),
    (dict(loss_type="cispo", cispo_low=0, cispo_high=1, eps_high=0.1), "eps_high"),
    (dict(loss_type="cispo", cispo_low=0, eps_low=0.1), "eps_low"),
    (dict(eps_low=-1), "eps_low"), (dict(eps_high=-1), "eps_high"), (dict(eps_low=math.nan), "eps_low"),
    (dict(log_ratio_cap=0), "log_ratio_cap"), (dict(loss_type="reinforce", log_ratio_cap=5.0), "log_ratio_cap"),
    (dict(dual_clip=0.5), "dual_clip"), (dict(dual_clip=1.0), "dual_clip"),  # c > 1, as verl's clip_ratio_c
    (dict(loss_type="gspo", dual_clip=3), "dual_clip"),
    (dict(delta=-1), "delta"), (dict(delta=0), "delta"), (dict(loss_type="sapo", delta=2), "delta"),
    (dict(cispo_low=0), "cispo_low"), (dict(loss_type="gspo", cispo_high=1), "cispo_high"),
    (dict(loss_type="cispo", cispo_low=2, cispo_high=1), "cispo_high"),
    (dict(loss_type="cispo", cispo_low=1.5), "cispo_low"),  # above the default cispo_high, 1 + eps_high
    (dict(loss_type="cispo", cispo_high=0.5), "cispo_high"),  # below the default cispo_low, 1 - eps_low
    (dict(loss_type="cispo", cispo_high=math.inf), "cispo_high"),
    (dict(sapo_tau_pos=1), "sapo_tau_pos"), (dict(loss_type="vespo", sapo_tau_neg=1), "sapo_tau_neg"),
    (dict(loss_type="sapo", sapo_tau_neg=-1), "sapo_tau_neg"), (dict(loss_type="sapo", sapo_tau_pos=0), "sapo_tau_pos"),
    (dict(loss_type="sapo", sapo_tau_neg=math.nan), "sapo_tau_neg"),
    (dict(vespo_k_pos=1), "vespo_k_pos"), (dict(loss_type="sapo", vespo_k_neg=1), "vespo_k_neg"),
    (dict(vespo_lambda_pos=1), "vespo_lambda_pos"), (dict(loss_type="cispo", vespo_lambda_neg=1), "vespo_lambda_neg"),
    (dict(loss_type="vespo", vespo_lambda_neg=math.inf), "vespo_lambda_neg"),
    (dict(dro_beta=1), "dro_beta"), (dict(loss_type="dro"), "dro_beta"),
    (dict(cov_ratio=1), "cov_ratio"), (dict(loss_type="clip_cov", cov_ratio=-1), "cov_ratio"),
    (dict(loss_type="kl_cov", cov_ratio=1.5), "cov_ratio"), (dict(loss_type="clip_cov", cov_ratio=40), "cov_ratio"),
    (dict(cov_lb=1), "cov_lb"), (dict(loss_type="kl_cov", cov_ub=1), "cov_ub"),
    (dict(loss_type="clip_cov", cov_lb=5, cov_ub=1), "cov_lb"),
    (dict(loss_type="clip_cov", cov_lb=2, cov_ub=2), "cov_lb"),  # an empty band (cov_lb < cov_ub)
    (dict(cov_kl_coef=1), "cov_kl_coef"),
    (dict(cov_global=True), "cov_global"), (dict(cov_group=object()), "cov_group"),
    (dict(kl_type="zz"), "kl_type"), (dict(kl_rho=1), "kl_rho"), (dict(kl_coef=math.inf), "kl_coef"),
    (dict(entropy_agg="x"), "entropy_agg"), (dict(entropy_agg="token-mean"), "entropy_agg"),
    (dict(rollout_correction="x"), "rollout_correction"), (dict(rollout_min=0.1), "rollout_min"),
    (dict(rollout_max=3.0), "rollout_max"), (dict(rollout_max=-1.0), "rollout_max"),
    (dict(rollout_correction="token_mask", rollout_min=5.0), "rollout_min"),
    (dict(entropy_quantile=2.0), "entropy_quantile"), (dict(dp_size=0), "dp_size"), (dict(max_len=4), "max_len"),
    (dict(backend="gpu"), "backend"),  # was accepted, refused at the first forward only
]


@pytest.mark.parametrize("options, option", CASES, ids=[f"{o}-{i}" for i, (_, o) in enumerate(CASES)])
def test_value_errors_name_their_option(options, option):
    """A trainer profile found the option by parsing the message's first word; each value error is an
    ``OptionError`` (a ``ValueError``) with the option as an attribute, its message naming the option."""
    with pytest.raises(OptionError) as error:
        PolicyConfig(**options)
    assert isinstance(error.value, ValueError)
    assert error.value.option == option and option in str(error.value)


def test_option_error_pickles():
    """Errors cross process boundaries (multiprocessing, distributed launchers) with their option."""
    with pytest.raises(OptionError) as error:
        PolicyConfig(eps_low=-1)
    copy = pickle.loads(pickle.dumps(error.value))
    assert (type(copy), copy.option, str(copy)) == (OptionError, "eps_low", str(error.value))


@pytest.mark.parametrize("options", [dict(eps_low="0.1"), dict(kl_clamp="x"), dict(dp_size=1.5)])
def test_type_errors_stay_type_errors(options):
    with pytest.raises(TypeError):
        PolicyConfig(**options)


@pytest.mark.parametrize("options, option", [
    (dict(kl_coef=None), "kl_coef"), (dict(entropy_coef=None), "entropy_coef"),
    (dict(loss_type="cispo", cispo_low="0.8"), "cispo_low"),
    (dict(loss_type="sapo", sapo_tau_neg=True), "sapo_tau_neg"),
    (dict(loss_type="vespo", vespo_k_pos=(2.0, 3.0)), "vespo_k_pos")])
def test_none_for_a_number_is_a_type_error_at_construction(options, option):
    """kl_coef / entropy_coef are not Optional: None is refused when the config (or a PolicyLoss) is built,
    naming the option, not by a bare float() at the first call; so is a string, a bool or a pair for a row's
    number (the former pair options are cispo_low / cispo_high, sapo_tau_pos / sapo_tau_neg, ...)."""
    with pytest.raises(TypeError, match=re.escape(option)):
        PolicyConfig(**options)
    with pytest.raises(TypeError, match=re.escape(option)):
        PolicyLoss(**options)


@pytest.mark.parametrize("options, option, error", [
    (dict(loss_type="cispo", cispo_bounds=(1,)), "cispo_bounds", ValueError),
    (dict(loss_type="cispo", cispo_bounds="ab"), "cispo_bounds", ValueError),
    (dict(loss_type="cispo", cispo_bounds=(0, math.inf)), "cispo_bounds[1]", ValueError),
    (dict(loss_type="cispo", cispo_bounds=(2, 1)), "cispo_high", ValueError),
    (dict(loss_type="sapo", sapo_tau=(1, -1)), "sapo_tau_neg", ValueError),
    (dict(sapo_tau=(1, 1)), "sapo_tau_pos", ValueError),  # read by sapo alone
    (dict(loss_type="vespo", vespo_k=(math.nan, 1)), "vespo_k[0]", ValueError),
    (dict(loss_type="cispo", cispo_bounds=(None, 1.28)), "cispo_bounds[0]", TypeError),
    (dict(loss_type="sapo", sapo_tau=[1.0, None]), "sapo_tau[1]", TypeError)])
def test_former_pair_options_are_checked_as_their_options(options, option, error):
    """The former pair options (cispo_bounds, sapo_tau, vespo_k, vespo_lambda) set two named options each, with a
    RenamedWarning: a value that is not a pair of finite numbers raises naming the former option (``[i]``: which
    entry), a pair then raises as its two options would; None inside a pair is refused, not taken as the
    default."""
    from fastalign._deprecate import RenamedWarning

    for make in (PolicyConfig, PolicyLoss):
        with pytest.warns(RenamedWarning), pytest.raises(error, match=re.escape(option)) as caught:
            make(**options)
        if error is ValueError:
            assert caught.value.option == option.split("[")[0]


@pytest.mark.parametrize("name, loss_type, value", [
    ("cispo_bounds", "cispo", [0, 1.28]), ("sapo_tau", "sapo", [1.0, 1.05]), ("vespo_k", "vespo", [2, 3]),
    ("vespo_lambda", "vespo", np.array([3.0, 2.0]))])
def test_former_pair_options_given_as_a_list_make_the_same_config(name, loss_type, value):
    """A former pair given as a list (or an array) sets the same two options as a tuple: the frozen config stays
    hashable and equal to the one built from the named options."""
    from fastalign._deprecate import RenamedWarning
    from fastalign.policy_config import PAIR_RENAMES

    named = PolicyConfig(loss_type=loss_type, **dict(zip(PAIR_RENAMES[name], (float(v) for v in value))))
    with pytest.warns(RenamedWarning, match=f"{name}="):
        given = PolicyConfig(loss_type=loss_type, **{name: value})
    assert given == named and hash(given) == hash(named)
    with pytest.warns(RenamedWarning, match=f"PolicyLoss\\({name}="):
        assert PolicyLoss(loss_type=loss_type, **{name: value}).config == named
