import pytest

from quantnoise import QuantNoiseConfig


@pytest.mark.parametrize("field,value", [
    ("scheme", "int3"), ("p", -0.1), ("p", 1.5), ("block_size", 0), ("bits", 1), ("bits", 9),
    ("granularity", "row"), ("observer", "histogram"), ("n_centroids", 1), ("refresh_every", 0),
    ("include", "fc[1"), ("ema_momentum", 0.0),
])
def test_bad_value_names_field_and_value(field, value):
    with pytest.raises(ValueError) as e:
        QuantNoiseConfig(**{field: value})
    assert f"{field}={value!r}" in str(e.value)


def test_drop_rejects_p_one_but_scalar_and_pq_accept_it():
    with pytest.raises(ValueError, match="p=1"):
        QuantNoiseConfig(scheme="drop", p=1.0)
    assert QuantNoiseConfig(scheme="scalar", p=1.0).p == 1.0
    assert QuantNoiseConfig(scheme="pq", p=1.0).p == 1.0


def test_eval_quantized_needs_a_quantizing_scheme():
    with pytest.raises(ValueError, match="eval_quantized"):
        QuantNoiseConfig(scheme="drop", eval_quantized=True)


def test_grid_bounds():
    assert (QuantNoiseConfig(bits=8).qmin, QuantNoiseConfig(bits=8).qmax) == (-127, 127)
    asym = QuantNoiseConfig(bits=4, symmetric=False)
    assert (asym.qmin, asym.qmax) == (0, 15)


def test_is_a_hydra_structured_config():
    from omegaconf import OmegaConf

    cfg = OmegaConf.structured(QuantNoiseConfig)
    merged = OmegaConf.merge(cfg, OmegaConf.from_dotlist(["scheme=scalar", "bits=4"]))
    assert QuantNoiseConfig(**OmegaConf.to_container(merged)).bits == 4
