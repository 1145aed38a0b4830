"""The chat command: which policies a run folder holds, adapters sharing their base in memory, streamed
answers equal to the whole answer for the same seed, scores and lengths, and `scripts/chat.py` end to end."""

import subprocess
import sys

import pytest
import torch
from ppo_tiny import make_model, make_tokenizer, one_thread
from sft_helpers import REPO, write_pairs
from test_rl_script import reward_model, rl_rows

from stackllama.chat import (
    AnswerStream,
    ChatArguments,
    ChatSession,
    SamplingSettings,
    answer_question,
    find_policies,
    questions,
    select_policies,
)
from stackllama.evaluation.policies import PolicySpec, load_policies, load_policy_tokenizer
from stackllama.chat.terminal import PROMPT
from stackllama.errors import InputError, MissingInputError

pytestmark = pytest.mark.usefixtures(one_thread.__name__)

QUESTION = "w1 w2 w3 w4"


def save_adapter(tok, folder, base_dir, seed, trained=True):
    """A LoRA adapter over `base_dir` (its recorded base); `trained`: B != 0, so it changes the model."""
    from peft import LoraConfig, get_peft_model

    config = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], task_type="CAUSAL_LM")
    peft = get_peft_model(make_model(tok, seed=0), config)
    if trained:
        torch.manual_seed(seed)
        with torch.no_grad():
            for name, param in peft.named_parameters():
                if "lora_B" in name:
                    param.normal_(0, 0.5)
    peft.peft_config["default"].base_model_name_or_path = str(base_dir)
    peft.save_pretrained(folder)
    tok.save_pretrained(folder)


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """runs/<run>/ as the stages leave it: base, sft (adapter) + sft-merged, ppo (an adapter over sft-merged),
    dpo (another adapter over it), reward, and data."""
    run = tmp_path_factory.mktemp("run")
    tok = make_tokenizer()
    write_pairs(run / "data", rl_rows([3, 4, 5]), subset="evaluation")
    for folder in ("base", "sft-merged"):
        make_model(tok, seed=0).save_pretrained(run / folder)
        tok.save_pretrained(run / folder)
    save_adapter(tok, run / "sft", run / "base", seed=3)
    save_adapter(tok, run / "ppo", run / "sft-merged", seed=1)
    save_adapter(tok, run / "dpo", run / "sft-merged", seed=2)
    reward_model(tok).save_pretrained(run / "reward")
    tok.save_pretrained(run / "reward")
    (run / "report").mkdir()
    return run


def test_find_policies_reads_what_the_stages_wrote(run, tmp_path):
    found = find_policies(run)
    assert [(s.name, s.path) for s in found] == [
        ("SFT", str(run / "sft-merged")), ("PPO", str(run / "ppo")), ("DPO", str(run / "dpo"))]
    # no base, no reward model, no folder without weights; the last-trained policy by default
    assert select_policies(run, None, compare=False) == [found[1]]
    assert select_policies(run, ["dpo", "SFT"], compare=False) == [found[2], found[0]]
    assert select_policies(run, [str(run / "ppo")], compare=False) == [PolicySpec("ppo", str(run / "ppo"))]
    with pytest.raises(MissingInputError, match=r"no policy 'grpo' in .*found: sft, ppo, dpo"):
        select_policies(run, ["grpo"], compare=False)
    with pytest.raises(MissingInputError, match="no trained policy in"):
        select_policies(tmp_path, None, compare=True)
    with pytest.raises(MissingInputError, match="run folder .* not found"):
        find_policies(tmp_path / "nothing")


def logits(policy, ids):
    with policy.active():
        return policy.model(input_ids=ids).logits


def test_adapters_over_one_base_share_it_and_stay_distinct(run):
    """SFT full weights, PPO and DPO adapters over them: one model in memory; each policy's logits are those of
    the policy loaded on its own."""
    specs = find_policies(run)
    loaded = load_policies(specs, dtype="float32", device="cpu")
    sft, ppo, dpo = loaded
    assert sft.model is ppo.model is dpo.model and sft.adapter_disabled
    ids = torch.tensor([[5, 6, 7, 8]])
    alone = [load_policies([spec], dtype="float32", device="cpu")[0] for spec in specs]
    for shared, single in zip((sft, ppo, dpo, sft, ppo), alone + alone[:2]):  # switching back and forth
        torch.testing.assert_close(logits(shared, ids), logits(single, ids))
    assert not torch.allclose(logits(ppo, ids), logits(dpo, ids))


@pytest.fixture(scope="module")
def sft_policy(run):
    (policy,) = load_policies([find_policies(run)[0]], dtype="float32", device="cpu")
    return policy, load_policy_tokenizer(policy.path)


def test_streamed_answer_equals_the_whole_answer_for_the_same_seed(sft_policy):
    policy, tok = sft_policy
    settings = SamplingSettings(max_new_tokens=12, seed=5)
    stream = AnswerStream(policy, tok, QUESTION, settings)
    pieces = list(stream)
    whole = answer_question(policy, tok, QUESTION, settings)
    assert len(pieces) > 1 and "".join(pieces) == stream.answer.text == whole.text
    assert stream.answer.response_ids == whole.response_ids and 0 < whole.tokens <= 12
    assert whole.text == tok.decode(whole.response_ids, skip_special_tokens=True)
    other = [answer_question(policy, tok, QUESTION, SamplingSettings(max_new_tokens=12, seed=s)).response_ids
             for s in (6, 7)]
    assert whole.response_ids not in other  # the seed matters: sampling, not greedy


class FixedLogits(torch.nn.Module):
    """An LM head that always prefers one token (or never picks it, with a negative boost)."""

    def __init__(self, vocab_size, token, boost):
        super().__init__()
        self.vocab_size, self.token, self.boost = vocab_size, token, boost

    def forward(self, hidden):
        logits = torch.zeros(*hidden.shape[:-1], self.vocab_size)
        logits[..., self.token] = self.boost
        return logits


def test_answers_end_at_eos_or_at_the_limit_and_say_so():
    from stackllama.evaluation.policies import Policy

    tok = make_tokenizer()
    model = make_model(tok)
    policy = Policy("P", "p", model, "full weights")
    model.lm_head = FixedLogits(len(tok), tok.eos_token_id, 30.0)
    answer = answer_question(policy, tok, QUESTION, SamplingSettings(max_new_tokens=5))
    assert (answer.tokens, answer.ended, answer.text) == (0, True, "")
    assert answer.summary() == "0 tokens · ended with EOS"
    model.lm_head = FixedLogits(len(tok), tok.eos_token_id, -float("inf"))
    answer = answer_question(policy, tok, QUESTION, SamplingSettings(max_new_tokens=5))
    assert (answer.tokens, answer.ended) == (5, False) and tok.eos_token_id not in answer.response_ids
    assert answer.summary() == "5 tokens · cut at the token limit"


def test_score_and_length_of_an_answer(run, sft_policy):
    from stackllama.reward_scoring import RewardFunction

    policy, tok = sft_policy
    reward_fn = RewardFunction.from_pretrained(str(run / "reward"), dtype="float32", fast_path="off")
    answer = answer_question(policy, tok, QUESTION, SamplingSettings(max_new_tokens=10, seed=1), reward_fn)
    expected = reward_fn([f"Question: {QUESTION}\n\nAnswer: " + answer.text])[0]
    assert answer.score == pytest.approx(expected, abs=1e-6)
    assert answer.summary().startswith(f"reward {answer.score:.3f} · {answer.tokens} tokens · ")


def test_bad_sampling_flags_and_long_questions_are_one_line_errors(sft_policy):
    policy, tok = sft_policy
    for settings, message in ((SamplingSettings(temperature=0), "--temperature"), (SamplingSettings(top_p=0), "--top_p"),
                              (SamplingSettings(max_new_tokens=0), "--max_new_tokens")):
        with pytest.raises(InputError, match=message):
            answer_question(policy, tok, QUESTION, settings)
    with pytest.raises(InputError, match=r"the question is \d+ tokens; .* over the model's 256 positions"):
        answer_question(policy, tok, " ".join(["w1"] * 250), SamplingSettings(max_new_tokens=10))
    with pytest.raises(InputError, match="the question is empty"):
        answer_question(policy, tok, "   ", SamplingSettings())


def test_session_without_reward_model_answers_unscored(run, tmp_path):
    (tmp_path / "sft-merged").symlink_to(run / "sft-merged")
    session = ChatSession.load(ChatArguments(run_dir=str(tmp_path), dtype="float32", device="cpu"))
    assert session.names == ["SFT"] and session.reward_fn is None
    (answer,) = session.answers(QUESTION, SamplingSettings(max_new_tokens=4))
    assert answer.score is None and "reward" not in answer.summary()


def chat(*args, cwd, stdin=None):
    return subprocess.run([sys.executable, str(REPO / "scripts" / "chat.py"), *args], capture_output=True, text=True,
                          cwd=cwd, timeout=300, input=stdin)


def test_chat_script_compares_every_policy_with_scores(run):
    proc = chat("--run_dir", str(run), "--question", QUESTION, "--compare", "--max_new_tokens", "6",
                "--num_threads", "1", cwd=run)
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = proc.stdout
    for name, folder in (("SFT", "sft-merged"), ("PPO", "ppo"), ("DPO", "dpo")):
        assert f"── {name} ({run / folder})" in out
    table = out.split("policy  reward")[1].splitlines()[1:4]
    assert [row.split()[0] for row in table] == ["SFT", "PPO", "DPO"]
    scores = [float(row.split()[1]) for row in table]
    assert all(f"[reward {s:.3f} · " in out for s in scores)



def test_questions_come_from_the_flag_the_terminal_or_stdin():
    import io

    assert list(questions("only this", stdin=io.StringIO("not read\n"))) == ["only this"]
    piped = io.StringIO(f"{QUESTION}\n  w5 w6 \n\nafter the empty line\n")
    assert list(questions(None, stdin=piped)) == [QUESTION, "w5 w6"]

    class Terminal(io.StringIO):
        def isatty(self):
            return True

    shown = io.StringIO()
    assert list(questions(None, stdin=Terminal("w1\n"), stdout=shown)) == ["w1"]
    assert shown.getvalue() == PROMPT * 2  # asked again after the answer; end of input ends the loop


def test_chat_script_errors_are_one_line(run, tmp_path):
    proc = chat("--run_dir", str(tmp_path / "missing"), "--question", "q", cwd=tmp_path)
    assert proc.returncode == 1 and "Traceback" not in proc.stderr
    assert proc.stderr.strip().splitlines()[-1].startswith("chat.py: error: run folder ")


def test_chat_loop_answers_each_question_and_ends_quietly_on_ctrl_c(monkeypatch):
    import io

    from stackllama.chat import terminal

    asked = []

    def answer_all(session, question, settings, out):
        asked.append(question)
        out.write(f"answer to {question}")
        if question == "stop here":
            raise KeyboardInterrupt  # Ctrl-C mid-answer

    monkeypatch.setattr(terminal, "answer_all", answer_all)
    out = io.StringIO()
    assert terminal.chat(None, None, SamplingSettings(), stdin=io.StringIO("q1\nq2\n"), out=out) == 0
    assert asked == ["q1", "q2"]
    out = io.StringIO()
    assert terminal.chat(None, None, SamplingSettings(), stdin=io.StringIO("q1\nstop here\nq3\n"), out=out) == 130
    assert asked[2:] == ["q1", "stop here"] and out.getvalue().endswith("answer to stop here\n")
