"""Synthetic gradients through time (zdni/recurrent.py) and the sequence tasks (zdni/sequence.py)."""

from __future__ import annotations

import pytest
import torch

from zdni.optim import Updater
from zdni.optimspec import OptimSpec
from zdni.recurrent import RecurrentNet, StateSynthesizer, full_bptt, train_sequence
from zdni.sequence import Curriculum, bit_errors, copy_batch, repeat_copy_batch


def net_and_batch(seed: int = 0, cell: str = "lstm"
                  ) -> tuple[RecurrentNet, tuple[torch.Tensor, ...]]:
    torch.manual_seed(seed)
    net = RecurrentNet(10, 16, 9, cell)
    return net, copy_batch(4, 6, generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("cell", ["lstm", "gru"])
@pytest.mark.parametrize("T", [1, 2, 3, 5])
def test_dni_with_an_oracle_equals_full_bptt(T: int, cell: str) -> None:
    """With M replaced by an oracle returning the true future gradient at each chunk's end, the
    chunks' parameter gradients add up to full BPTT's over the same sequence (LSTM and GRU)."""
    net, (x, y, mask) = net_and_batch(cell=cell)
    future = full_bptt(net, x, y, mask, T)
    want = {n: p.grad.clone() for n, p in net.named_parameters()}
    net.zero_grad(set_to_none=True)
    train_sequence(net, x, y, mask, T, mode="dni", oracle=lambda k, state: future[k])
    for name, p in net.named_parameters():
        torch.testing.assert_close(p.grad, want[name], rtol=1e-5, atol=1e-6, msg=name)


def test_truncated_bptt_drops_the_future() -> None:
    """Plain truncation (or a zero M) gives different gradients from full BPTT: the gradient
    from beyond each chunk is what DNI puts back."""
    net, (x, y, mask) = net_and_batch()
    full_bptt(net, x, y, mask, 3)
    want = {n: p.grad.clone() for n, p in net.named_parameters()}
    net.zero_grad(set_to_none=True)
    train_sequence(net, x, y, mask, 3, mode="bptt")
    assert not torch.allclose(net.cell.weight_hh.grad, want["cell.weight_hh"])


def test_m_learns_toward_the_true_future_gradient() -> None:
    """Trained only on the bootstrapped targets each next chunk sends back, M's predictions at
    the chunk ends turn toward the true future gradient (cosine 0 at the start, as M starts at
    zero; above 0.2 after 100 sequences on a fixed batch and network)."""
    net, _ = net_and_batch()
    synth = StateSynthesizer(16, 64)
    synth_opt = Updater(OptimSpec(lr=1e-2), synth.parameters())
    x, y, mask = copy_batch(8, 4, generator=torch.Generator().manual_seed(1))

    def cosine() -> float:
        future = full_bptt(net, x, y, mask, 1)
        net.zero_grad(set_to_none=True)
        state, sims = net.zero_state(8), []
        with torch.no_grad():
            for k in range(x.shape[0] - 1):
                _, state = net.chunk(x[k:k + 1], state)
                p, t = torch.cat(synth(*state), 1).flatten(), torch.cat(future[k], 1).flatten()
                if t.norm() > 0:
                    sims.append(float(p @ t / (p.norm() * t.norm() + 1e-12)))
        return sum(sims) / len(sims)

    assert cosine() == 0.0
    for _ in range(100):
        train_sequence(net, x, y, mask, 1, "dni", synth, None, synth_opt)
        net.zero_grad(set_to_none=True)  # the net stays fixed: M chases a still target
    assert cosine() > 0.2


def test_copy_and_repeat_copy_batches() -> None:
    """Copy scores the written-back vectors; Repeat Copy wants them `repeats` times and an end
    marker; a perfect output makes no bit errors."""
    x, y, mask = copy_batch(2, 3, bits=4, generator=torch.Generator().manual_seed(0))
    assert x.shape == (7, 2, 6) and y.shape == (7, 2, 5) and mask.sum() == 2 * 3
    torch.testing.assert_close(y[4:, :, :4], x[:3, :, :4])
    x, y, mask = repeat_copy_batch(2, 2, 3, bits=4, generator=torch.Generator().manual_seed(0))
    assert x.shape[0] == 2 + 1 + 3 * 2 + 1 and y[-1, :, 4].tolist() == [1.0, 1.0]
    torch.testing.assert_close(y[3:5, :, :4], y[7:9, :, :4])
    assert bit_errors(y * 20 - 10, y, mask) == 0.0


def test_curriculum_lengthens_once_solved() -> None:
    """A length is solved after a window of batches under 0.15 bit errors on average."""
    cur = Curriculum(length=1, window=3)
    assert not any(cur.observe(e) for e in (1.0, 0.1, 0.1))  # average 0.4: not yet
    assert cur.observe(0.1) is True  # the window is 0.1, 0.1, 0.1 now
    assert (cur.length, cur.best_solved) == (2, 1)


CORPUS = "the quick brown fox jumps over the lazy dog. " * 60


def test_a_corpus_from_a_text_file(tmp_path) -> None:  # type: ignore[no-untyped-def]
    """Vocabulary from the file, the last tenth for testing, contiguous streams whose targets
    are the next characters; files that are not usable text are one clear DataError."""
    from zdni.data import DataError
    from zdni.sequence import Corpus

    path = tmp_path / "corpus.txt"
    path.write_text(CORPUS)
    corpus = Corpus.from_file(path)
    assert corpus.vocab == "".join(sorted(set(CORPUS))) and corpus.size == 28
    assert len(corpus.train) + len(corpus.test) == len(CORPUS)
    assert len(corpus.test) == len(CORPUS) - int(len(CORPUS) * 0.9)
    windows = list(corpus.streams(corpus.train, 4, 10))
    x, y, mask = windows[0]
    assert x.shape == (10, 4, 28) and y.shape == (10, 4) and mask.sum() == 40
    assert torch.equal(x[1:].argmax(2), y[:-1])  # each target is the next input
    assert torch.equal(windows[1][0][0].argmax(1), y[-1])  # streams go on across windows
    decoded = "".join(corpus.vocab[i] for i in x[:, 0].argmax(1))
    assert decoded == CORPUS[:10]
    for content, says in ((b"\xff\xfe\x00bad", "not UTF-8"), (b"too short", "too few")):
        (tmp_path / "bad.txt").write_bytes(content)
        with pytest.raises(DataError, match=says):
            Corpus.from_file(tmp_path / "bad.txt")
    with pytest.raises(DataError, match="no such text file"):
        Corpus.from_file(tmp_path / "missing.txt")


@pytest.mark.parametrize("cell", ["lstm", "gru"])
def test_dni_with_an_oracle_equals_full_bptt_on_characters(tmp_path, cell: str) -> None:  # type: ignore[no-untyped-def]
    """The oracle equivalence holds for the language model's loss (cross-entropy over
    characters) too."""
    from zdni.recurrent import char_loss
    from zdni.sequence import Corpus

    (tmp_path / "c.txt").write_text(CORPUS)
    corpus = Corpus.from_file(tmp_path / "c.txt")
    x, y, mask = next(corpus.streams(corpus.train, 3, 12))
    torch.manual_seed(0)
    net = RecurrentNet(corpus.size, 16, corpus.size, cell)
    future = full_bptt(net, x, y, mask, 4, loss_fn=char_loss)
    want = {n: p.grad.clone() for n, p in net.named_parameters()}
    net.zero_grad(set_to_none=True)
    train_sequence(net, x, y, mask, 4, "dni", oracle=lambda k, state: future[k],
                   loss_fn=char_loss)
    for name, p in net.named_parameters():
        torch.testing.assert_close(p.grad, want[name], rtol=1e-5, atol=1e-6, msg=name)


@pytest.mark.parametrize("mode", ["bptt", "dni"])
def test_a_language_model_learns_the_text(tmp_path, mode: str) -> None:  # type: ignore[no-untyped-def]
    """Trained in chunks of T = 4 over a repetitive text, both methods get far under the
    uniform guess of log2(vocabulary) bits per character on the held-out part."""
    import math

    from zdni.recurrent import char_loss
    from zdni.sequence import Corpus, bits_per_char

    (tmp_path / "c.txt").write_text(CORPUS)
    corpus = Corpus.from_file(tmp_path / "c.txt")
    torch.manual_seed(0)
    net = RecurrentNet(corpus.size, 32, corpus.size)
    opt = Updater(OptimSpec(lr=1e-2), net.parameters())
    synth = StateSynthesizer(32) if mode == "dni" else None
    synth_opt = Updater(OptimSpec(lr=1e-3), synth.parameters()) if synth else None
    before = bits_per_char(net, corpus, streams=4, length=20)
    assert before == pytest.approx(math.log2(corpus.size), abs=0.3)
    state = net.zero_state(8)
    for _ in range(2):
        for x, y, mask in corpus.streams(corpus.train, 8, 16):
            state = train_sequence(net, x, y, mask, 4, mode, synth, opt, synth_opt,
                                   loss_fn=char_loss, state=state, goes_on=True)["state"]
    assert bits_per_char(net, corpus, streams=4, length=20) < 1.5


def test_a_recurrent_layer_s_M_follows_the_run_s_recipe() -> None:
    """A pipeline's recurrent layer (ChunkLayer) updates its M through time by the run's recipe
    for M (here SGD with a step schedule), built by build_stages in a worker as in process; its
    schedule advances once per training chunk, a sequence's first (no target yet) included,
    and not on an evaluation chunk."""
    from zdni.config import RunConfig
    from zdni.models import build_stages
    from zdni.recurrent import ChunkLayer
    from zdni.sequence import copy_chunks

    cfg = RunConfig(model="copy-lstm", model_args={"hidden": 8, "layers": 2},
                    dataset="copy-L2-T2", batch_size=4, eval_batch_size=4, stages=2,
                    synth_lr=0.1, epoch_batches=12, epochs=1,
                    synth_optim={"optimizer": "sgd", "momentum": 0.0, "lr_schedule": "step",
                                 "lr_gamma": 0.5}).validate()
    layers = [m for s in build_stages(cfg) for m in s.modules() if isinstance(m, ChunkLayer)]
    assert len(layers) == 2
    assert all(type(layer.synth_up.opt) is torch.optim.SGD for layer in layers)
    layer = layers[0]
    x, _ = copy_chunks(1, 4, 2, 2)  # one batch of sequences: 3 chunks of T = 2
    before = [p.detach().clone() for p in layer.synth.parameters()]
    for k in range(3):  # M first learns at the third chunk, from the second's start
        assert layer.synth_loss == 0.0
        assert all(torch.equal(a, b) for a, b in zip(before, layer.synth.parameters()))
        assert layer.synth_up.lr == pytest.approx(0.1 * 0.5 ** k)
        layer(x[4 * k:4 * k + 4])[:, :, 1:].pow(2).sum().backward()
    assert layer.synth_up.lr == pytest.approx(0.1 * 0.5 ** 3)
    assert layer.synth_loss > 0
    assert any(not torch.equal(a, b) for a, b in zip(before, layer.synth.parameters()))
    layer(x[:4])
    assert layer.synth_up.lr == pytest.approx(0.1 * 0.5 ** 4)
    layer.eval()
    with torch.no_grad():
        layer(x[:4])
    assert layer.synth_up.lr == pytest.approx(0.1 * 0.5 ** 4)
