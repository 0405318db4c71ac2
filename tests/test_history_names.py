"""The one spelling of the history's module keys and store field names (metaclm_ext.history_names)."""
import pytest

from metaclm_ext.history_names import FieldName, field_name, module_key, parse_field_name, parse_module_key


@pytest.mark.parametrize("module", ["attn", "mlp"])
@pytest.mark.parametrize("signal", ["in", "err"])
@pytest.mark.parametrize("layer", [0, 3, 11])
def test_field_names_and_module_keys_round_trip(module, signal, layer):
    assert parse_field_name(field_name(module, layer, signal)) == FieldName(module, signal, layer)
    assert parse_module_key(module_key(module, layer)) == (module, layer)


def test_the_spelling_is_the_one_on_disk():
    assert field_name("attn", 3) == "attn_in.3"
    assert field_name("mlp", 0, "err") == "mlp_err.0"
    assert module_key("mlp", 2) == "mlp.2"


@pytest.mark.parametrize("name", ["attn_in", "attn_in.x", "attn_out.0", "ffn_in.0", "attn.0", "step", "attn_in.-1"])
def test_parse_field_name_refuses_other_names(name):
    with pytest.raises(ValueError, match="not a history field name"):
        parse_field_name(name)


@pytest.mark.parametrize("key", ["attn", "attn_in.0", "mlp.x", "ffn.1"])
def test_parse_module_key_refuses_other_keys(key):
    with pytest.raises(ValueError, match="not a c_proj key"):
        parse_module_key(key)
