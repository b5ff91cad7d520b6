"""Finding registered embeddings in prompts (pure Python: no torch, no registry on disk)."""

from __future__ import annotations

import subprocess
import sys
from dataclasses import dataclass

import pytest

from textinv_cli.errors import TextinvError
from textinv_cli.engine.prompt_tokens import (bracket_words, check_families, embeddings_in_prompt,
                                       family_mismatch_error, find_tokens, is_ordinary_word, prompt_embeddings)


@dataclass
class E:  # the fields of registry.Entry that prompt matching reads
    name: str
    token: str
    family: str = "sd1"


CAT = E("cat-toy", "<cat-toy>")
STYLE = E("watercolor", "<watercolor-style>")
CHART = E("charturner", "charturner")
XL = E("xl-thing", "<xl-thing>", "sdxl")
ENTRIES = [CAT, STYLE, CHART, XL]


def names(entries):
    return [e.name for e in entries]


@pytest.mark.parametrize("prompt", [
    "A <cat-toy> backpack", "A <cat-toy>, backpack", "<cat-toy>", "(<cat-toy>:1.2) on a table",
    "a photo of<cat-toy>", "<cat-toy>s everywhere",  # brackets delimit the token themselves
])
def test_bracket_token_is_found_wherever_its_brackets_are(prompt):
    assert names(embeddings_in_prompt(prompt, "", ENTRIES)) == ["cat-toy"]


@pytest.mark.parametrize("prompt, found", [
    ("charturner, a woman in a red coat", ["charturner"]),
    ("a charturner sheet", ["charturner"]),
    ("(charturner:1.1)", ["charturner"]),
    ("charturner-style sheet", ["charturner"]),
    ("charturnerv2, a woman", []),        # a longer word, not the token
    ("mycharturner", []),
    ("charturner_2", []),                 # underscore is a word character
    ("Charturner", []),                   # case-sensitive, as the tokenizer's added tokens are
])
def test_plain_word_token_only_as_a_whole_word(prompt, found):
    assert names(embeddings_in_prompt(prompt, "", ENTRIES)) == found


def test_several_tokens_in_order_of_appearance_each_once():
    got = embeddings_in_prompt("<watercolor-style> painting of <cat-toy>, charturner, <cat-toy> again", "", ENTRIES)
    assert names(got) == ["watercolor", "cat-toy", "charturner"]


def test_negative_prompt_tokens_are_loaded_too():
    got = embeddings_in_prompt("A backpack", "<watercolor-style>, charturner", ENTRIES)
    assert names(got) == ["watercolor", "charturner"]
    both = embeddings_in_prompt("A <cat-toy>", "<cat-toy>, blurry", ENTRIES)
    assert names(both) == ["cat-toy"]


def test_no_tokens_no_embeddings():
    assert embeddings_in_prompt("a photo of a dog", "blurry", ENTRIES) == []
    assert embeddings_in_prompt("a photo of a dog", "", []) == []


def test_unknown_bracket_token_lists_close_names():
    with pytest.raises(TextinvError) as err:
        embeddings_in_prompt("A <cat-tyo> backpack", "", ENTRIES)
    assert err.value.message == "Unknown embedding <cat-tyo> in the prompt."
    assert "<cat-toy>" in err.value.hint
    assert "textinv list" in err.value.hint and "textinv import" in err.value.hint


def test_unknown_token_in_negative_prompt_and_empty_registry():
    with pytest.raises(TextinvError, match="Unknown embedding <bad-hands>"):
        embeddings_in_prompt("a dog", "<bad-hands>", ENTRIES)
    with pytest.raises(TextinvError) as err:
        embeddings_in_prompt("A <cat-toy>", "", [])
    assert "registry is empty" in err.value.hint


def test_unknown_token_suggests_by_name_too():
    entries = [E("cat-toy", "cat-toy-token")]
    with pytest.raises(TextinvError) as err:
        embeddings_in_prompt("A <cat-toy> backpack", "", entries)
    assert "cat-toy-token" in err.value.hint  # typed <name>: the real token is suggested


def test_not_every_angle_bracket_is_a_token():
    # "<3" has no closing bracket before a space; <lora:x:0.8> is A1111's extra-network syntax
    assert bracket_words("I <3 cats, <lora:add-detail:0.8>, a < b > c") == []
    assert embeddings_in_prompt("I <3 <cat-toy>", "", ENTRIES) == [CAT]


def test_longest_token_wins_where_tokens_overlap():
    short, long = E("cat", "cat"), E("cat-toy-word", "cat-toy")
    assert [m.token for m in find_tokens("a cat-toy and a cat", ["cat", "cat-toy"])] == ["cat-toy", "cat"]
    assert names(embeddings_in_prompt("a cat-toy", "", [short, long])) == ["cat-toy-word"]


@dataclass
class V(E):  # an entry as the registry reports it: versions of one token, one active
    active: bool = True


def test_a_shared_token_means_its_active_entry_or_the_one_named_with_use():
    a, b = V("cat-toy", "<cat-toy>", active=False), V("cat-toy-v2", "<cat-toy>")
    assert names(embeddings_in_prompt("A <cat-toy>", "", [a, b])) == ["cat-toy-v2"]
    assert names(embeddings_in_prompt("A <cat-toy>", "", [a, b], use=[a])) == ["cat-toy"]
    with pytest.raises(TextinvError, match="both <cat-toy>"):
        embeddings_in_prompt("A <cat-toy>", "", [a, b], use=[a, b])
    with pytest.raises(TextinvError) as err:  # --use for a token the prompt lacks: says what to write
        embeddings_in_prompt("A dog", "", [a, b], use=[a])
    assert err.value.hint == 'Write <cat-toy> in the prompt, e.g. textinv sample "a photo of <cat-toy>" --use cat-toy'
    with pytest.raises(TextinvError, match="none is active"):  # e.g. the active row is damaged
        embeddings_in_prompt("A <cat-toy>", "", [V("x", "<cat-toy>", active=False), V("y", "<cat-toy>", active=False)])


def test_a_registry_name_typed_as_a_word_loads_that_entry_as_a1111_does():
    a, b = V("cat-toy", "<cat-toy>", active=False), V("cat-toy-v3", "<cat-toy>")
    got = prompt_embeddings("a photo of cat-toy-v3 and cat-toy, cat-toy-v3s", "", [a, b])
    assert [(u.entry.name, u.token) for u in got.used] == [("cat-toy-v3", "cat-toy-v3"), ("cat-toy", "cat-toy")]
    assert len(got.notes) == 2 and "as A1111 loads an embedding by its name" in got.notes[0]
    both = prompt_embeddings("<cat-toy> next to cat-toy", "", [a, b])  # two versions side by side
    assert [(u.entry.name, u.token) for u in both.used] == [("cat-toy-v3", "<cat-toy>"), ("cat-toy", "cat-toy")]
    with pytest.raises(TextinvError) as err:  # the name in brackets: not a token, says both ways
        embeddings_in_prompt("a <cat-toy-v3>", "", [a, b])
    assert "write cat-toy-v3 without brackets, or <cat-toy> with --use cat-toy-v3" in err.value.hint


def test_a_name_that_is_an_ordinary_word_stays_a_word_with_a_note():
    orange = V("orange", "<orange>")
    got = prompt_embeddings("an orange cat", "", [orange, V("cat-toy", "<cat-toy>")])
    assert got.used == [] and got.notes == ['"orange" in the prompt is an ordinary word and stays one; '
                                             "the registry entry orange is typed <orange>."]
    assert is_ordinary_word("cat") and is_ordinary_word("Orange") and not is_ordinary_word("charturner")


def test_family_mismatch_names_both_families():
    sd2 = E("wide", "<wide>", "sd2")
    with pytest.raises(TextinvError) as err:
        check_families([CAT, sd2], "tiny-sd1", "sd1")
    assert err.value.message == "<wide> is a Stable Diffusion 2.x embedding but tiny-sd1 is Stable Diffusion 1.x."
    assert "--model" in err.value.hint
    check_families([CAT], "tiny-sd1", "sd1")  # same family: fine
    check_families([sd2, XL], "owner/model", None)  # unknown here (Hub id): the backend checks
    msg = family_mismatch_error("<x>", "sdxl", "m", "sd2", "its vectors are clip_l 768, clip_g 1280 wide").message
    assert msg.startswith("<x> is a Stable Diffusion XL embedding but m is Stable Diffusion 2.x.") and "1280" in msg


def test_family_mismatch_suggests_the_model_the_embedding_records():
    @dataclass
    class WithMeta(E):
        meta: dict = None

    sd2 = WithMeta("wide", "<wide>", "sd2", {"base_model": "stabilityai/stable-diffusion-2-1"})
    with pytest.raises(TextinvError) as err:
        check_families([sd2], "tiny-sd1", "sd1")
    assert err.value.hint == "Pass --model stabilityai/stable-diffusion-2-1 (the model it was trained on)."
    a1111 = WithMeta("old", "<old>", "sd2", {"sd_checkpoint_name": "v2-1_768-ema-pruned"})
    with pytest.raises(TextinvError) as err:
        check_families([a1111], "tiny-sd1", "sd1")
    assert "v2-1_768-ema-pruned" in err.value.hint


def test_module_imports_without_torch_or_numpy():
    code = ("import sys, textinv_cli.engine.prompt_tokens; "
            "bad = [m for m in ('torch', 'numpy', 'diffusers') if m in sys.modules]; print(bad)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


def test_an_old_entry_whose_token_is_an_ordinary_word_is_used_with_a_note():
    got = prompt_embeddings("a cat on a mat", "", [V("kitty", "cat")])
    assert [u.entry.name for u in got.used] == ["kitty"] and '"cat" in the prompt is the token of' in got.notes[0]
