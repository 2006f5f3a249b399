"""Training progress: plain periodic lines with an ETA off a terminal, a tqdm bar on one, and
an end-of-epoch line whose LR keeps its digits."""
import io

from effdetr.utils.progress import Progress, format_epoch


class FakeTTY(io.StringIO):
    def isatty(self):
        return True


def test_plain_lines_carry_the_figures_and_an_eta_and_end_on_the_last_step():
    out = io.StringIO()
    p = Progress(every_s=3600.0, stream=out)  # only the first and the last step print
    p.start_epoch(2, 10, 40)  # resumed at step 10
    for it in range(11, 41):
        p.update(it, 1.23456, 2e-5, 7.0)
    lines = out.getvalue().splitlines()
    assert len(lines) == 2
    assert lines[0].startswith("epoch 2 iter 11/40 loss 1.2346 lr 2.00e-05 7.0 img/s eta ")
    assert lines[1].startswith("epoch 2 iter 40/40 ") and lines[1].endswith("eta 0:00:00")
    assert "\r" not in out.getvalue()


def test_a_terminal_gets_a_tqdm_bar_that_starts_where_the_epoch_resumed():
    out = FakeTTY()
    p = Progress(every_s=0.0, stream=out)
    p.start_epoch(0, 5, 20)
    assert p.bar is not None and p.bar.n == 5
    p.update(6, 0.5, 1e-4, 3.0)
    assert p.bar.n == 6
    p.close()
    text = out.getvalue()
    assert "epoch 0" in text and "6/20" in text and "loss 0.5000 lr 1.00e-04" in text and "img/ss" not in text


def test_epoch_line_formats_lr_in_scientific_notation():
    line = format_epoch({"train_loss": 1.234567, "epoch": 3, "lr": 1e-5, "epoch_seconds": 12.345})
    assert line == "train_loss=1.2346 epoch=3 lr=1.00e-05 epoch_seconds=12.3"
