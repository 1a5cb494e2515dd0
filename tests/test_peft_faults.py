"""numlm.peft where a second fault pass found it apart from peft and AdapterHub: bfloat16 adapter files,
heads saved for another model class."""
import shutil
import warnings

import numpy as np
import pytest
from safetensors.numpy import load_file

import numlm
from numlm import peft

from conftest import FIXTURES
from test_checkpoint_files import _to_bfloat16_values, _write_bfloat16

HF, PEFT = FIXTURES / "hf", FIXTURES / "peft"


def base(name, cls, dtype="float32", **kw):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # a head newly initialised
        return cls.from_pretrained(HF / name, dtype=dtype, **kw)


@pytest.mark.parametrize("fixture, weights", [("lora-bert-tiny-seqcls", "adapter_model.safetensors"),
                                              ("adapter-bert-tiny-seqcls", "adapter.safetensors")])
def test_a_bfloat16_adapter_file_loads_the_values_it_holds(tmp_path, fixture, weights):
    """peft saves an adapter trained in bfloat16 as bfloat16 (AdapterHub too); numlm reads such a model
    checkpoint, and reads the adapter too: every tensor equals the bfloat16 value the file holds."""
    d = tmp_path / "adapter"
    shutil.copytree(PEFT / fixture / "adapter", d)
    want = {k: _to_bfloat16_values(v.astype(np.float32)) for k, v in load_file(str(d / weights)).items()}
    _write_bfloat16(want, d / weights)
    pm = peft.PeftModel.from_pretrained(base("bert-tiny-seqcls", numlm.BertForSequenceClassification), d)
    got = pm.state_dict()
    for k, v in want.items():
        np.testing.assert_array_equal(got[k], v)


def test_an_adapterhub_head_saved_for_another_model_class_is_refused():
    """head_config.json names the class the head was saved from (AdapterHub refuses a head of another
    class): a sequence classifier's head is not loaded into a token classifier's classifier of the same
    shape, and the refused load leaves the model as it was."""
    model = base("bert-tiny", numlm.BertForTokenClassification, num_labels=3)
    before = {k: v.copy() for k, v in model.state_dict().items()}
    with pytest.raises(ValueError, match="BertForSequenceClassification.*BertForTokenClassification"):
        peft.PeftModel.from_pretrained(model, PEFT / "adapter-bert-tiny-seqcls" / "adapter")
    after = model.state_dict()
    assert set(after) == set(before)
    for k, v in before.items():
        np.testing.assert_array_equal(after[k], v)
    assert getattr(model, "_peft", None) is None
