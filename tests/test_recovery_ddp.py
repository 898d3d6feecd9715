"""Recovery under ``accelerate launch`` with 2 CPU processes (DDP over gloo), as a user would run it."""

import json
import socket
import subprocess
import sys
from pathlib import Path

import pytest
from transformers import AutoModelForCausalLM

import course_lib.pruned_modeling  # registers the pruned types
from tiny import weights_digest

SCRIPT = Path(__file__).with_name("ddp_recovery.py")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_two_processes_train_to_the_same_weights_and_the_saved_model_reloads(tmp_path):
    command = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
               "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
               "--main_process_port", str(_free_port()), str(SCRIPT), str(tmp_path)]
    done = subprocess.run(command, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1)]
    assert [r["world_size"] for r in ranks] == [2, 2]
    assert ranks[0]["digest"] == ranks[1]["digest"]  # DDP: every rank ends with the same weights
    assert ranks[0]["best_eval_loss"] < ranks[0]["initial_eval_loss"] - 1.0  # the loss went down
    assert ranks[0]["tokens"] == 4096  # the budget is global: 32 steps of 2 processes x 4 rows x 16 tokens
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "model")
    assert weights_digest(reloaded) == ranks[0]["digest"]
    assert reloaded.model.layers[0].self_attn.q_proj.out_features == 2 * 8  # still pruned: 2 of 4 query heads


def test_the_shipped_fsdp_configuration_is_one_accelerate_reads_as_fsdp():
    from accelerate.commands.config.config_args import load_config_from_file
    from accelerate.utils import DistributedType

    config = load_config_from_file(str(Path(course_lib.pruned_modeling.__file__).parent / "configs"
                                       / "accelerate_fsdp.yaml"))
    assert config.distributed_type == DistributedType.FSDP
    assert config.fsdp_config["fsdp_state_dict_type"] == "FULL_STATE_DICT" and config.mixed_precision == "bf16"
