"""Linear probe on frozen MiniLM features for `sentiment`: pooler output vs mean pooling.

Run from the repository root: ``PYTHONPATH=src python docs/lab/lr-sentiment/linear_probe.py``.
It prints the held-out accuracy of a logistic regression trained to convergence on each
kind of frozen feature (the ceiling a head-only method can reach on this split).
"""

import torch

from deltatune.lab.tasks import get_task


def features(task, loaded, rows, max_length):
    """Return (pooler outputs, mean-pooled last hidden states, labels) of ``rows``."""
    pooled, means, labels = [], [], []
    for i in range(0, len(rows), 64):
        batch = task._encode(loaded, rows[i:i + 64], max_length)
        labels.append(batch.pop("labels"))
        with torch.no_grad():
            out = loaded.model.bert(**batch)
        mask = batch["attention_mask"].unsqueeze(-1).float()
        pooled.append(out.pooler_output)
        means.append((out.last_hidden_state * mask).sum(1) / mask.sum(1))
    return torch.cat(pooled), torch.cat(means), torch.cat(labels)


def probe(x, y, x_test, y_test, steps=2000, lr=1e-2):
    """Fit a 2-way logistic regression with full-batch Adam; return test accuracy."""
    w = torch.zeros(x.shape[1], 2, requires_grad=True)
    b = torch.zeros(2, requires_grad=True)
    opt = torch.optim.Adam([w, b], lr=lr)
    for _ in range(steps):
        opt.zero_grad()
        torch.nn.functional.cross_entropy(x @ w + b, y).backward()
        opt.step()
    return float(((x_test @ w + b).argmax(-1) == y_test).float().mean())


def main():
    """Print the probe accuracies of both feature kinds."""
    torch.manual_seed(0)
    task = get_task("sentiment")
    loaded = task.load(torch.device("cpu"))
    loaded.model.eval()
    size = task.size("default")
    p_tr, m_tr, y_tr = features(task, loaded, task._train_rows(size), size.max_length)
    p_te, m_te, y_te = features(task, loaded, task._eval_rows(size), size.max_length)
    print("linear probe (converged, 2000 full-batch Adam steps): pooler",
          probe(p_tr, y_tr, p_te, y_te), "mean-pool", probe(m_tr, y_tr, m_te, y_te))


if __name__ == "__main__":
    main()
