// One token through the cache of every (row, head): the transition of the L states, the score, the
// policy's decisions, the merges, the write and the read. The mirror of `dla_mlx.ops.reference` for T = 1.
// Launch: one threadgroup per (row, head), grid (32 * NSG, 1, B * H); thread j owns column j of every
// state. States are float32 [B, H, L, Dk, Dv], read in the physical layout of `DLAState` (slot i is
// S_decay * S_in[slot[i]]; slot int32 [B, H, L], S_decay [B, H]) and written in the canonical one (slot i at
// index i); q, k [B, H, Dk], v [B, H, Dv], g, beta [B, H], lam [B, H, L], n, ibar [B, H, L], opened [B, H]
// (boundaries so far), pos, active [B], threshold [H] (one per head).
// Inputs are float32. Templates: Dk, Dv, L, H, NSG, POLICY, MERGE, SCORE, DELTA, SCORED.
uint bh = threadgroup_position_in_grid.z;
uint b = bh / H;
uint h = bh % H;
uint j = thread_position_in_threadgroup.x;
bool col = j < Dv;
bool on = active[b];
// slot i's buffer; a slot map out of range (a corrupted cache) stays inside this cache's buffers
#define BUFFER(i) (S_in + (bh * L + min(uint(slot[bh * L + (i)]), uint(L - 1))) * Dk * Dv)
const device float* S0 = BUFFER(0);
device float* S1 = S_out + bh * L * Dk * Dv;
float carried = S_decay[bh];  // the old states are `carried` times their buffers
const device float* k_ = k + bh * Dk;
const device float* q_ = q + bh * Dk;
float decay = exp(g[bh]);
float bt = DELTA ? beta[bh] : 1.0f;
float vj = col ? v[bh * Dv + j] : 0.0f;

// The score from three scalars, ||S~||^2 and <S~, s_t> over the newest state and ||v||^2; only where a decision
// reads it (SCORED, `DLAConfig.scored`, a template constant: the same branch for the whole threadgroup).
float score = 0.0f;
threadgroup float red[3 * NSG];
if (SCORED) {
  float terms[3] = {0.0f, 0.0f, vj * vj};
  if (col) {
    float kS = 0.0f;
    if (DELTA) for (int r = 0; r < Dk; ++r) kS += k_[r] * S0[r * Dv + j];
    for (int r = 0; r < Dk; ++r) {
      float s = decay * carried * (S0[r * Dv + j] - bt * k_[r] * kS);
      terms[0] += s * s;
      terms[1] += s * k_[r] * bt * vj;
    }
  }
  dla_sum3<NSG>(terms, red, thread_index_in_simdgroup, simdgroup_index_in_threadgroup);
  float k_sq = 0.0f;
  for (int r = 0; r < Dk; ++r) k_sq += k_[r] * k_[r];
  score = dla_score<SCORE>(terms[0], k_sq * terms[2] * bt * bt, terms[1], float(Dk * Dv), eps);
}

int n[L];
float ibar[L];
int dest[L];
for (int i = 0; i < L; ++i) {
  n[i] = n_in[bh * L + i];
  ibar[i] = ibar_in[bh * L + i];
}
bool opened = dla_plan<L, POLICY, MERGE>(n, ibar, dest, pos[b], score, on, block_size, threshold[h]);
if (j == 0) {
  opened_out[bh] = opened_in[bh] + (opened && pos[b] > 0 ? 1 : 0);  // a sequence's first token is no boundary
  for (int i = 0; i < L; ++i) {
    n_out[bh * L + i] = n[i];
    ibar_out[bh * L + i] = ibar[i];
  }
}
if (col) {
  float o = 0.0f;
  if (!on) {  // padding changes nothing and reads zero
    for (int i = 0; i < L; ++i)
      for (int r = 0; r < Dk; ++r) S1[(i * Dk + r) * Dv + j] = carried * BUFFER(i)[r * Dv + j];
  } else {
    for (int e = 0; e < L * Dk; ++e) S1[e * Dv + j] = 0.0f;
    for (int i = 0; i < L; ++i) {  // transition every state, and move it to its new slot
      const device float* Si = BUFFER(i);
      float kS = 0.0f;
      if (DELTA) for (int r = 0; r < Dk; ++r) kS += k_[r] * Si[r * Dv + j];
      device float* Sd = S1 + dest[i] * Dk * Dv;
      for (int r = 0; r < Dk; ++r) Sd[r * Dv + j] += decay * carried * (Si[r * Dv + j] - bt * k_[r] * kS);
    }
    for (int r = 0; r < Dk; ++r) S1[r * Dv + j] += bt * k_[r] * vj;  // the write into slot 0
    for (int i = 0; i < L; ++i) {
      float read = 0.0f;
      for (int r = 0; r < Dk; ++r) read += q_[r] * S1[(i * Dk + r) * Dv + j];
      o += lam[bh * L + i] * read;
    }
    o *= scale;
  }
  out[bh * Dv + j] = o;
}
