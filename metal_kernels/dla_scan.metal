// The decision scan of the chunkwise prefill: the mirror of `dla_shared.scan`, line for line.
// Launch: one threadgroup per (row, head), grid (32 * NSG, 1, B * H); thread j carries column j of the
// newest state X [Dk, Dv] through the T tokens; all threads hold the same bookkeeping and decisions.
// k [B, T, H, Dk], v [B, T, H, Dv], g, beta [B, T, H], active [B, T], X_in [B, H, Dk, Dv] float32,
// n, ibar [B, H, L], opened [B, H], pos [B], threshold [H] (one per head); out: sigma int16 [B, H, T, L + C]
// (see `dla_shared.scan`), n, ibar, opened. Where no decision reads a score (SCORED false,
// `DLAConfig.scored`) X is not carried.
// Templates: Dk, Dv, L, C, H, NSG, POLICY, MERGE, SCORE, DELTA, SCORED.
uint bh = threadgroup_position_in_grid.z;
uint b = bh / H;
uint h = bh % H;
uint j = thread_position_in_threadgroup.x;
uint threads = 32 * NSG;
bool col = j < Dv;
float x[Dk];
for (int r = 0; r < Dk; ++r) x[r] = col ? X_in[(bh * Dk + r) * Dv + j] : 0.0f;
int n[L];
float ibar[L];
int dest[L];
for (int i = 0; i < L; ++i) {
  n[i] = n_in[bh * L + i];
  ibar[i] = ibar_in[bh * L + i];
}
int p = pos[b];
int boundaries = opened_in[bh];
int slot_of[L + C];
threadgroup float red[3 * NSG];
for (int t = 0; t < T; ++t) {
  if (t % C == 0) {  // a new chunk: carried states sit in their own slots, no token yet
    for (int i = 0; i < L + C; ++i) slot_of[i] = i < L ? i : -1;
  }
  bool on = active[b * T + t];
  if (on) {  // the same for the whole threadgroup, so the barriers below are reached by all
    uint row = (b * T + t) * H + h;
    const device float* k_ = k + row * Dk;
    float decay = exp(g[row]);
    float bt = DELTA ? beta[row] : 1.0f;
    float vj = col ? v[row * Dv + j] : 0.0f;
    float score = 0.0f;
    if (SCORED) {  // a template constant: the whole threadgroup takes the same branch
      float kS = 0.0f;
      if (DELTA) for (int r = 0; r < Dk; ++r) kS += k_[r] * x[r];
      float terms[3] = {0.0f, 0.0f, vj * vj};
      for (int r = 0; r < Dk; ++r) {
        x[r] = decay * (x[r] - bt * k_[r] * kS);  // S~, the newest state after the transition
        terms[0] += x[r] * x[r];
        terms[1] += x[r] * k_[r] * bt * vj;
      }
      dla_sum3<NSG>(terms, red, thread_index_in_simdgroup, simdgroup_index_in_threadgroup);
      float k_sq = 0.0f;
      for (int r = 0; r < Dk; ++r) k_sq += k_[r] * k_[r];
      score = dla_score<SCORE>(terms[0], k_sq * terms[2] * bt * bt, terms[1], float(Dk * Dv), eps);
    }
    bool opened = dla_plan<L, POLICY, MERGE>(n, ibar, dest, p, score, true, block_size, threshold[h]);
    boundaries += opened && p > 0 ? 1 : 0;  // a sequence's first token is no boundary
    if (SCORED)
      for (int r = 0; r < Dk; ++r) x[r] = (opened ? 0.0f : x[r]) + bt * k_[r] * vj;
    for (int i = 0; i < L + C; ++i) slot_of[i] = slot_of[i] >= 0 ? dest[slot_of[i]] : -1;
    slot_of[L + t % C] = 0;
    p += 1;
  }
  device short* row_out = sigma + (bh * T + t) * (L + C);
  for (uint i = j; i < L + C; i += threads) row_out[i] = short(slot_of[i]);
}
if (j == 0) {
  opened_out[bh] = boundaries;
  for (int i = 0; i < L; ++i) {
    n_out[bh * L + i] = n[i];
    ibar_out[bh * L + i] = ibar[i];
  }
}
