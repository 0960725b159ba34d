"""Linear probe on frozen MiniLM features for `sentiment`: pooler output vs mean pooling."""
import torch
from deltatune.lab.tasks import get_task
torch.manual_seed(0)
t = get_task("sentiment"); L = t.load(torch.device("cpu")); size = t.size("default")
m = L.model.eval()
def feats(rows):
    P, M, Y = [], [], []
    for i in range(0, len(rows), 64):
        b = t._encode(L, rows[i:i+64], size.max_length); y = b.pop("labels")
        with torch.no_grad():
            o = m.bert(**b)
        mask = b["attention_mask"].unsqueeze(-1).float()
        P.append(o.pooler_output); M.append((o.last_hidden_state * mask).sum(1) / mask.sum(1)); Y.append(y)
    return torch.cat(P), torch.cat(M), torch.cat(Y)
tr, te = t._train_rows(size), t._eval_rows(size)
Ptr, Mtr, Ytr = feats(tr); Pte, Mte, Yte = feats(te)
def probe(X, Y, Xt, Yt, steps=2000, lr=1e-2):
    w = torch.zeros(X.shape[1], 2, requires_grad=True); b = torch.zeros(2, requires_grad=True)
    opt = torch.optim.Adam([w, b], lr=lr)
    for _ in range(steps):
        opt.zero_grad(); loss = torch.nn.functional.cross_entropy(X @ w + b, Y); loss.backward(); opt.step()
    return float(((Xt @ w + b).argmax(-1) == Yt).float().mean())
print("linear probe (converged, 2000 full-batch Adam steps): pooler", probe(Ptr, Ytr, Pte, Yte), "mean-pool", probe(Mtr, Ytr, Mte, Yte))
