"""benchmarks/conv_layout.py: the three arms compute the same conv, values and gradients."""

import numpy as np
import pytest

from benchmarks import conv_layout


@pytest.mark.parametrize("layout", sorted(conv_layout.LAYOUTS))
def test_every_layout_is_the_same_conv_in_values_and_gradients(layout):
  n, hw, c = 2, 6, 3
  dn, px, pw = conv_layout.LAYOUTS[layout]
  x, w = conv_layout.operands(n, hw, c, layout, seed=1)
  loss, (dx, dw) = conv_layout.loss_and_grads(dn)(x, w)
  x0, w0 = (np.asarray(a, np.float64) for a in conv_layout.operands(n, hw, c, "NHWC/HWIO", 1))
  xp = np.pad(x0, ((0, 0), (1, 1), (1, 1), (0, 0)))  # a float64 SAME conv, NHWC / HWIO
  patches = {(i, j): xp[:, i : i + hw, j : j + hw, :] for i in range(3) for j in range(3)}
  y = sum(np.einsum("nhwc,ct->nhwt", patches[ij], w0[ij]) for ij in patches)
  g = 2.0 * np.maximum(y, 0.0)  # d loss / d y
  np.testing.assert_allclose(loss, np.sum(np.maximum(y, 0.0) ** 2), rtol=1e-5)
  gw, gxp = np.zeros_like(w0), np.zeros_like(xp)
  for i in range(3):
    for j in range(3):
      gw[i, j] = np.einsum("nhwc,nhwt->ct", patches[i, j], g)
      gxp[:, i : i + hw, j : j + hw, :] += np.einsum("nhwt,ct->nhwc", g, w0[i, j])
  gx = gxp[:, 1:-1, 1:-1, :]
  dx0 = np.transpose(np.asarray(dx), np.argsort(px))  # back to NHWC / HWIO
  dw0 = np.transpose(np.asarray(dw), np.argsort(pw))
  np.testing.assert_allclose(dx0, gx, rtol=1e-4, atol=1e-5)
  np.testing.assert_allclose(dw0, gw, rtol=1e-4, atol=1e-5)


def test_repeats_below_one_is_refused(capsys):
  with pytest.raises(SystemExit) as e:
    conv_layout.main(["--repeats", "0"])
  assert e.value.code == 2 and "--repeats must be >= 1, got 0" in capsys.readouterr().err


def test_rows_name_each_layout_and_the_ratio_to_ours():
  rows = conv_layout.measure(shapes=((2, 4, 2),), repeats=2)
  assert [r["layout"] for r in rows] == list(conv_layout.LAYOUTS)
  ours = rows[0]["median_ms"]
  for r in rows:
    assert (r["batch"], r["hw"], r["channels"], r["repeats"]) == (2, 4, 2, 2)
    assert r["vs_ours"] == pytest.approx(ours / r["median_ms"])
    assert r["device"].startswith("cpu")
