// Shared by the DLA Metal kernels (header of every `mx.fast.metal_kernel` in `dla_mlx.ops.metal`):
// the information score, one token's cache decisions for one (row, head), and a threadgroup sum.
// Scalar mirrors of `dla_shared.policy.score_from_terms` and `dla_shared.policy.plan`.

enum { POLICY_SINGLE = 0, POLICY_FENWICK = 1, POLICY_FIXED = 2, POLICY_DLA = 3 };
enum { MERGE_OLDEST = 0, MERGE_DENSITY = 1 };
enum { SCORE_TOKEN_DRIFT = 0, SCORE_STATE_DRIFT = 1 };

// Eq. 13 from ||S~||^2, ||s_t||^2 and <S~, s_t>, with R(X) = X / sqrt(mean(X^2) + eps); size = Dk * Dv.
template <int SCORE>
inline float dla_score(float state_sq, float token_sq, float cross, float size, float eps) {
  float r_state = 1.0f / sqrt(state_sq / size + eps);
  float other_sq = SCORE == SCORE_TOKEN_DRIFT ? token_sq : state_sq + token_sq + 2.0f * cross;
  float other_cross = SCORE == SCORE_TOKEN_DRIFT ? cross : state_sq + cross;
  float r_other = 1.0f / sqrt(other_sq / size + eps);
  float dist_sq = r_other * r_other * other_sq + r_state * r_state * state_sq - 2.0f * r_other * r_state * other_cross;
  return sqrt(max(dist_sq, 0.0f)) / (r_state * sqrt(state_sq) + eps);
}

// One token's decisions: dest[j] is the new slot of old slot j (merges share one), and n / ibar [L]
// become the bookkeeping after the token; threshold is the head's own. Returns whether the token opened
// a state (a sequence's first token included). Every thread of a threadgroup calls this with the same
// arguments, so all of them hold the same decisions. The host has checked that a fenwick cache has
// enough levels for the positions it will see.
template <int L, int POLICY, int MERGE>
inline bool dla_plan(thread int* n, thread float* ibar, thread int* dest, int pos, float score, bool active,
                     int block_size, float threshold) {
  int m = 0;
  for (int i = 0; i < L; ++i) {
    dest[i] = i;
    m += n[i] > 0 ? 1 : 0;
  }
  if (!active) return false;
  bool empty = m == 0;
  if (empty) score = 0.0f;  // the first token opens the first state with I = 0
  bool opens = POLICY == POLICY_FENWICK || (POLICY == POLICY_FIXED && pos % block_size == 0) ||
               (POLICY == POLICY_DLA && score >= threshold);
  bool opened = empty || opens;
  if (opens && !empty) {
    if (POLICY == POLICY_FENWICK) {
      int j = 0;  // levels 0..j fold into level j + 1, j the number of trailing ones of pos - 1
      for (int x = pos - 1; (x & 1) != 0; x >>= 1) ++j;
      for (int i = 0; i <= j; ++i) dest[i] = j + 1;
    } else {
      int pair = -1;  // full: merge the adjacent pair (pair, pair + 1) first
      if (m == L) {
        pair = m - 2;
        if (MERGE == MERGE_DENSITY) {
          float best = INFINITY;
          for (int i = m - 2; i >= 0; --i) {  // ties go to the oldest pair; a NaN is least, as in numpy
            float density = (ibar[i] + ibar[i + 1]) / float(n[i] + n[i + 1]);
            if (isnan(density)) {
              pair = i;
              break;
            }
            if (density < best) {
              best = density;
              pair = i;
            }
          }
        }
      }
      for (int i = 0; i < L; ++i) dest[i] = min((pair >= 0 && i > pair ? i - 1 : i) + 1, L - 1);
    }
  }
  int n_new[L];
  float ibar_new[L];
  for (int i = 0; i < L; ++i) {
    n_new[i] = 0;
    ibar_new[i] = 0.0f;
  }
  for (int i = 0; i < L; ++i) {
    n_new[dest[i]] += n[i];
    ibar_new[dest[i]] += ibar[i];
  }
  for (int i = 0; i < L; ++i) {
    n[i] = n_new[i] + (i == 0 ? 1 : 0);
    ibar[i] = ibar_new[i] + (i == 0 ? score : 0.0f);
  }
  return opened;
}

// The sums over the threadgroup of three per-thread values; every thread gets them. red holds 3 * NSG
// floats of threadgroup memory, NSG the number of simdgroups; all threads of the group must call this.
template <int NSG>
inline void dla_sum3(thread float* x, threadgroup float* red, uint lane, uint simdgroup) {
  for (int i = 0; i < 3; ++i) {
    float s = simd_sum(x[i]);
    if (lane == 0) red[3 * simdgroup + i] = s;
  }
  threadgroup_barrier(mem_flags::mem_threadgroup);
  for (int i = 0; i < 3; ++i) {
    float total = 0.0f;
    for (int w = 0; w < NSG; ++w) total += red[3 * w + i];
    x[i] = total;
  }
  threadgroup_barrier(mem_flags::mem_threadgroup);  // red is written again by the next call
}
