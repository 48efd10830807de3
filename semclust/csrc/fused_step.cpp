// The fused stage-1 training step on CPU (OpenMP across rows, ATen GEMMs).
//
// Contract (semclust/ops/fused_step.py has the full statement and the PyTorch reference):
//   P = softmax(logits_i) [2B, K]: rows 0..B-1 the batch's images (p), rows B..2B-1 their
//   sampled image neighbours (p_n); Q = softmax(logits_t) likewise (q, q_n).
//   loss = w_instance   * instance(p, q, p_n, q_n)
//        + w_assignment * 0.5 (InfoNCE(p, q_n) + InfoNCE(q, p_n))        over the 2K columns
//        + w_center     * [centre InfoNCE of normalise(p^T u), normalise(q^T v)
//                          - 0.5 mean_i sum_k T_ik (log p_ik + log q_ik)]  (T only with centres)
//          T = softmax(v centers^T / center_tau): v the batch's text counterparts as given
//          (not normalised, no u), centers [K, D] in the text-counterpart space
//        + w_balance    * (KL(pbar || prior) + KL(qbar || prior))
//                          KL(m || prior) = sum_k m_k log m_k - sum_k m_k log prior_k
// with pbar = mean_{i<B} p_i, qbar likewise (the batch rows only), prior [K] positive
// (summing to 1; absent: uniform 1/K), and dloss/dlogits_i, dloss/dlogits_t, computed in
// the same call.
//
// Layout of the work: one row pass (softmax x4, instance term, centre-target term, column
// sums), GEMMs for the two cluster-level InfoNCEs and the centre InfoNCE with their small
// [2K, 2K] / [K, K] epilogues written as row loops, then one row pass that adds the
// balance gradient and applies the softmax backward in place. Row sums are taken over
// fixed blocks of rows and combined in block order, so results do not depend on the
// number of threads.

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <c10/util/Optional.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <tuple>
#include <vector>

#include "check_inputs.h"
#include "cpu_math.h"

namespace semclust_ext {
namespace {

// semclust.ops.reference._EPS: the clamp inside -log <p, q> and log p (gradient 0 below it)
constexpr double kEps = 1e-8;
// torch.nn.functional.normalize's default eps: norms below it are replaced by it
constexpr double kNormEps = 1e-12;
// rows per work item; fixed (not derived from the thread count) so sums are reproducible
constexpr int64_t kRowBlock = 32;

template <typename T>
struct StepBuffers {
  int64_t B, K, D;
  const T* li;  // [2B, K]
  const T* lt;
  T* P;   // [2B, K] softmax(logits_i)
  T* Q;
  T* GP;  // [2B, K] dloss/dP, then dloss/dlogits_i (in place)
  T* GQ;
};

// One pass over the batch: softmax of the four rows of sample i, the instance term and
// its gradient, the centre-target term and its gradient (vcen: v c^T, or nullptr), and
// per-block column sums of p and q. Returns (sum_i instance_i, sum_i target_i).
template <typename T>
std::pair<double, double> forward_rows(const StepBuffers<T>& s, const T* vcen, double center_tau, double w_instance,
                                       double w_center, std::vector<double>& colp, std::vector<double>& colq) {
  const int64_t B = s.B, K = s.K;
  const int64_t nblk = (B + kRowBlock - 1) / kRowBlock;
  colp.assign(nblk * K, 0.0);
  colq.assign(nblk * K, 0.0);
  std::vector<double> inst(nblk, 0.0), tgt(nblk, 0.0);
  const T log_eps = static_cast<T>(std::log(kEps));
  const T inv_ctau = static_cast<T>(1.0 / center_tau);
#pragma omp parallel num_threads(at::get_num_threads())
  {
    const DenormalsAreZero daz;
    std::vector<T> trow(vcen ? K : 0);
#pragma omp for schedule(static)
    for (int64_t blk = 0; blk < nblk; ++blk) {
      double inst_b = 0.0, tgt_b = 0.0;
      double* cp = colp.data() + blk * K;
      double* cq = colq.data() + blk * K;
      const int64_t i1 = std::min(B, (blk + 1) * kRowBlock);
      for (int64_t i = blk * kRowBlock; i < i1; ++i) {
        const T* lp = s.li + i * K;
        const T* lq = s.lt + i * K;
        T* p = s.P + i * K;
        T* pn = s.P + (B + i) * K;
        T* q = s.Q + i * K;
        T* qn = s.Q + (B + i) * K;
        const T lse_p = softmax_row(lp, p, K);
        softmax_row(s.li + (B + i) * K, pn, K);
        const T lse_q = softmax_row(lq, q, K);
        softmax_row(s.lt + (B + i) * K, qn, K);
        T d1 = 0, d2 = 0, d3 = 0;
#pragma omp simd reduction(+ : d1, d2, d3)
        for (int64_t k = 0; k < K; ++k) {
          d1 += p[k] * q[k];
          d2 += p[k] * qn[k];
          d3 += q[k] * pn[k];
        }
        // -log <p,q> - (log <p,q_n> + log <q,p_n>) / 2, each dot clamped at eps as in losses.py
        inst_b += -std::log(std::max<double>(d1, kEps)) -
                  0.5 * (std::log(std::max<double>(d2, kEps)) + std::log(std::max<double>(d3, kEps)));
        const T a1 = d1 >= kEps ? static_cast<T>(-w_instance / (B * static_cast<double>(d1))) : T(0);
        const T a2 = d2 >= kEps ? static_cast<T>(-0.5 * w_instance / (B * static_cast<double>(d2))) : T(0);
        const T a3 = d3 >= kEps ? static_cast<T>(-0.5 * w_instance / (B * static_cast<double>(d3))) : T(0);
        T* gp = s.GP + i * K;
        T* gpn = s.GP + (B + i) * K;
        T* gq = s.GQ + i * K;
        T* gqn = s.GQ + (B + i) * K;
#pragma omp simd
        for (int64_t k = 0; k < K; ++k) {
          gp[k] = a1 * q[k] + a2 * qn[k];
          gq[k] = a1 * p[k] + a3 * pn[k];
          gqn[k] = a2 * p[k];
          gpn[k] = a3 * q[k];
        }
        if (vcen) {
          // T_i = softmax(v_i c^T / tau_center): the prototype target (ops.assign's probs of v)
          const T* vr = vcen + i * K;
          T* t = trow.data();
          T m = -std::numeric_limits<T>::infinity();
          for (int64_t k = 0; k < K; ++k) {
            t[k] = vr[k] * inv_ctau;
            m = std::max(m, t[k]);
          }
          T sum = 0;
#pragma omp simd reduction(+ : sum)
          for (int64_t k = 0; k < K; ++k) {
            t[k] = exp_(t[k] - m);
            sum += t[k];
          }
          const T inv = T(1) / sum;
          const T ct = static_cast<T>(-0.5 * w_center / B);
          T acc = 0;
#pragma omp simd reduction(+ : acc)
          for (int64_t k = 0; k < K; ++k) {
            const T tk = t[k] * inv;
            // log(max(p, eps)) from the log-softmax: no log per element
            const T lpk = std::max(lp[k] - lse_p, log_eps);
            const T lqk = std::max(lq[k] - lse_q, log_eps);
            acc += tk * (lpk + lqk);
            gp[k] += p[k] >= T(kEps) ? ct * tk / p[k] : T(0);
            gq[k] += q[k] >= T(kEps) ? ct * tk / q[k] : T(0);
          }
          tgt_b += -0.5 * static_cast<double>(acc);
        }
        for (int64_t k = 0; k < K; ++k) {
          cp[k] += p[k];
          cq[k] += q[k];
        }
      }
      inst[blk] = inst_b;
      tgt[blk] = tgt_b;
    }
  }
  double inst_sum = 0.0, tgt_sum = 0.0;
  for (int64_t b = 0; b < nblk; ++b) {
    inst_sum += inst[b];
    tgt_sum += tgt[b];
  }
  return {inst_sum, tgt_sum};
}

// Cluster-level InfoNCE of the columns of a and b ([B, K] views), its value, and
// `weight` x its gradient added into ga, gb. With X = [a^T; b^T] ([2K, B]) and
// M = X X^T, sim = M / (c c^T tau) with c the clamped column norms; the gradient is
// dX = A X with A = H / (c c^T) - diag([n >= eps] s / c^2), H = (G + G^T) / tau,
// s_r = sum_l H_rl sim_rl tau: one [B, 2K] x [2K, 2K] product instead of autograd's two.
template <typename T>
double cluster_infonce(const at::Tensor& a, const at::Tensor& b, at::Tensor ga, at::Tensor gb, double tau,
                       double weight) {
  const int64_t K = a.size(1), K2 = 2 * K;
  at::Tensor M = at::empty({K2, K2}, a.options());
  at::Tensor Maa = M.narrow(0, 0, K).narrow(1, 0, K), Mab = M.narrow(0, 0, K).narrow(1, K, K);
  at::Tensor Mba = M.narrow(0, K, K).narrow(1, 0, K), Mbb = M.narrow(0, K, K).narrow(1, K, K);
  // three of the four K x K blocks: M is symmetric
  at::mm_out(Maa, a.t(), a);
  at::mm_out(Mab, a.t(), b);
  at::mm_out(Mbb, b.t(), b);
  Mba.copy_(Mab.t());
  T* m = M.data_ptr<T>();
  std::vector<T> ic(K2);
  std::vector<char> normal(K2);
  for (int64_t r = 0; r < K2; ++r) {
    const double n = std::sqrt(std::max<double>(m[r * K2 + r], 0.0));
    normal[r] = n >= kNormEps;
    ic[r] = static_cast<T>(1.0 / std::max(n, kNormEps));
  }
  at::Tensor G = at::empty({K2, K2}, a.options());
  T* g = G.data_ptr<T>();
  std::vector<double> row_loss(K2);
  const T inv_tau = static_cast<T>(1.0 / tau);
  const T coef = static_cast<T>(weight / K2);
  at::parallel_for(0, K2, 16, [&](int64_t r0, int64_t r1) {
    const DenormalsAreZero daz;
    std::vector<T> srow(K2);
    for (int64_t r = r0; r < r1; ++r) {
      const T* mr = m + r * K2;
      T* gr = g + r * K2;
      T* sr = srow.data();
      const T scale = ic[r] * inv_tau;
      T mx = -std::numeric_limits<T>::infinity();
      for (int64_t l = 0; l < K2; ++l) {
        sr[l] = mr[l] * scale * ic[l];
        if (l != r) mx = std::max(mx, sr[l]);
      }
      sr[r] = -std::numeric_limits<T>::infinity();  // a column is never its own negative
      T sum = 0;
#pragma omp simd reduction(+ : sum)
      for (int64_t l = 0; l < K2; ++l) {
        const T e = exp_(sr[l] - mx);
        gr[l] = e;
        sum += e;
      }
      const int64_t tgt = r < K ? r + K : r - K;
      row_loss[r] = static_cast<double>(mx) + std::log(static_cast<double>(sum)) - static_cast<double>(sr[tgt]);
      const T inv = coef / sum;
#pragma omp simd
      for (int64_t l = 0; l < K2; ++l) gr[l] *= inv;
      gr[tgt] -= coef;
      gr[r] = 0;
    }
  });
  at::Tensor Gt = G.t().contiguous();
  const T* gt = Gt.data_ptr<T>();
  // A overwrites M row by row: row r of A needs only row r of M, G and G^T
  at::parallel_for(0, K2, 16, [&](int64_t r0, int64_t r1) {
    const DenormalsAreZero daz;
    for (int64_t r = r0; r < r1; ++r) {
      T* mr = m + r * K2;
      const T* gr = g + r * K2;
      const T* gtr = gt + r * K2;
      const T icr = ic[r];
      T sacc = 0;
#pragma omp simd reduction(+ : sacc)
      for (int64_t l = 0; l < K2; ++l) {
        const T h = (gr[l] + gtr[l]) * inv_tau * icr * ic[l];
        sacc += h * mr[l];  // H_rl (M_rl / (c_r c_l)) with the 1/(c_r c_l) folded into h
        mr[l] = h;
      }
      mr[r] = normal[r] ? -sacc * icr * icr : T(0);
    }
  });
  // dX = A X, i.e. [ga | gb] += [a | b] A
  ga.addmm_(a, Maa);
  ga.addmm_(b, Mba);
  gb.addmm_(a, Mab);
  gb.addmm_(b, Mbb);
  double total = 0.0;
  for (int64_t r = 0; r < K2; ++r) total += row_loss[r];
  return total / K2;
}

// Row-normalise S [K, D] in place (F.normalize semantics); returns the norms.
template <typename T>
std::vector<double> normalize_rows(at::Tensor S) {
  const int64_t K = S.size(0), D = S.size(1);
  T* s = S.data_ptr<T>();
  std::vector<double> norms(K);
  at::parallel_for(0, K, 16, [&](int64_t k0, int64_t k1) {
    const DenormalsAreZero daz;
    for (int64_t k = k0; k < k1; ++k) {
      T* r = s + k * D;
      double acc = 0.0;
      for (int64_t d = 0; d < D; ++d) acc += static_cast<double>(r[d]) * r[d];
      norms[k] = std::sqrt(acc);
      const T inv = static_cast<T>(1.0 / std::max(norms[k], kNormEps));
#pragma omp simd
      for (int64_t d = 0; d < D; ++d) r[d] *= inv;
    }
  });
  return norms;
}

// dS = normalize backward of dC at C = S / max(|S|, eps): (dC - C <dC, C>) / |S|, or dC / eps
template <typename T>
void normalize_rows_backward(at::Tensor dC, const at::Tensor& C, const std::vector<double>& norms) {
  const int64_t K = C.size(0), D = C.size(1);
  T* dc = dC.data_ptr<T>();
  const T* c = C.data_ptr<T>();
  at::parallel_for(0, K, 16, [&](int64_t k0, int64_t k1) {
    const DenormalsAreZero daz;
    for (int64_t k = k0; k < k1; ++k) {
      T* g = dc + k * D;
      const T* cr = c + k * D;
      if (norms[k] >= kNormEps) {
        T dot = 0;
#pragma omp simd reduction(+ : dot)
        for (int64_t d = 0; d < D; ++d) dot += g[d] * cr[d];
        const T inv = static_cast<T>(1.0 / norms[k]);
#pragma omp simd
        for (int64_t d = 0; d < D; ++d) g[d] = (g[d] - cr[d] * dot) * inv;
      } else {
        const T inv = static_cast<T>(1.0 / kNormEps);
#pragma omp simd
        for (int64_t d = 0; d < D; ++d) g[d] *= inv;
      }
    }
  });
}

// Mean over rows of cross_entropy(L[r, :], r) for L [K, K] (contiguous), with its
// gradient coef * (softmax(L[r]) - e_r) written to dL.
template <typename T>
double diagonal_ce(const at::Tensor& L, at::Tensor dL, double coef) {
  const int64_t K = L.size(0);
  const T* l = L.data_ptr<T>();
  T* dl = dL.data_ptr<T>();
  std::vector<double> row_loss(K);
  at::parallel_for(0, K, 16, [&](int64_t r0, int64_t r1) {
    const DenormalsAreZero daz;
    for (int64_t r = r0; r < r1; ++r) {
      const T* lr = l + r * K;
      T* gr = dl + r * K;
      T mx = -std::numeric_limits<T>::infinity();
      for (int64_t c = 0; c < K; ++c) mx = std::max(mx, lr[c]);
      T sum = 0;
#pragma omp simd reduction(+ : sum)
      for (int64_t c = 0; c < K; ++c) {
        gr[c] = exp_(lr[c] - mx);
        sum += gr[c];
      }
      row_loss[r] = static_cast<double>(mx) + std::log(static_cast<double>(sum)) - static_cast<double>(lr[r]);
      const T inv = static_cast<T>(coef) / sum;
#pragma omp simd
      for (int64_t c = 0; c < K; ++c) gr[c] *= inv;
      gr[r] -= static_cast<T>(coef);
    }
  });
  double total = 0.0;
  for (int64_t r = 0; r < K; ++r) total += row_loss[r];
  return total / K;
}

// Centre InfoNCE: ci = normalise(p^T u), ct = normalise(q^T v), logits = ci ct^T / tau,
// 0.5 (CE(logits, diag) + CE(logits^T, diag)); `weight` x its gradient added into gp, gq.
template <typename T>
double center_infonce(const at::Tensor& p, const at::Tensor& q, const at::Tensor& u, const at::Tensor& v,
                      at::Tensor gp, at::Tensor gq, double tau, double weight) {
  const int64_t K = p.size(1);
  at::Tensor Ci = at::mm(p.t(), u);
  at::Tensor Ct = at::mm(q.t(), v);
  const std::vector<double> ni = normalize_rows<T>(Ci);
  const std::vector<double> nt = normalize_rows<T>(Ct);
  at::Tensor L = at::mm(Ci, Ct.t()).mul_(1.0 / tau);
  at::Tensor Lt = L.t().contiguous();
  at::Tensor dL = at::empty_like(L);
  at::Tensor dLt = at::empty_like(L);
  const double coef = 0.5 * weight / K;
  const double loss = 0.5 * (diagonal_ce<T>(L, dL, coef) + diagonal_ce<T>(Lt, dLt, coef));
  dL.add_(dLt.t());
  at::Tensor dCi = at::mm(dL, Ct).mul_(1.0 / tau);
  at::Tensor dCt = at::mm(dL.t(), Ci).mul_(1.0 / tau);
  normalize_rows_backward<T>(dCi, Ci, ni);
  normalize_rows_backward<T>(dCt, Ct, nt);
  gp.addmm_(u, dCi.t());
  gq.addmm_(v, dCt.t());
  return loss;
}

// Adds the balance gradient to the first B rows of G and applies the softmax backward
// dlogits = P * (G - <P, G>) to all 2B rows, in place.
template <typename T>
void backward_rows(T* P, T* G, int64_t B, int64_t K, const T* gbal) {
  at::parallel_for(0, 2 * B, kRowBlock, [&](int64_t r0, int64_t r1) {
    const DenormalsAreZero daz;
    for (int64_t r = r0; r < r1; ++r) {
      const T* pr = P + r * K;
      T* gr = G + r * K;
      if (r < B) {
#pragma omp simd
        for (int64_t k = 0; k < K; ++k) gr[k] += gbal[k];
      }
      T dot = 0;
#pragma omp simd reduction(+ : dot)
      for (int64_t k = 0; k < K; ++k) dot += pr[k] * gr[k];
#pragma omp simd
      for (int64_t k = 0; k < K; ++k) gr[k] = pr[k] * (gr[k] - dot);
    }
  });
}

template <typename T>
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> fused_step_impl(
    const at::Tensor& logits_i, const at::Tensor& logits_t, const at::Tensor& u, const at::Tensor& v,
    const c10::optional<at::Tensor>& centers, const c10::optional<at::Tensor>& prior, double cluster_tau,
    double center_tau, double w_instance, double w_assignment, double w_center, double w_balance) {
  const int64_t B = u.size(0), K = logits_i.size(1), D = u.size(1);
  at::Tensor li = logits_i.contiguous(), lt = logits_t.contiguous();
  at::Tensor uc = u.contiguous(), vc = v.contiguous();
  at::Tensor P = at::empty_like(li), Q = at::empty_like(lt);
  at::Tensor GP = at::empty_like(li), GQ = at::empty_like(lt);
  StepBuffers<T> s{B, K, D, li.data_ptr<T>(), lt.data_ptr<T>(), P.data_ptr<T>(), Q.data_ptr<T>(),
                   GP.data_ptr<T>(), GQ.data_ptr<T>()};

  // the centre target's logits v c^T (v as given: the centres live in the counterpart space)
  at::Tensor vcen;
  const bool with_centers = centers.has_value() && centers->defined();
  if (with_centers) vcen = at::mm(vc, centers->contiguous().t());

  std::vector<double> colp, colq;
  const auto sums = forward_rows<T>(s, with_centers ? vcen.data_ptr<T>() : nullptr, center_tau, w_instance, w_center,
                                    colp, colq);
  const double instance = sums.first / B;

  // column means of p and q: block partials combined in block order
  const int64_t nblk = (B + kRowBlock - 1) / kRowBlock;
  std::vector<double> pbar(K, 0.0), qbar(K, 0.0);
  for (int64_t b = 0; b < nblk; ++b)
    for (int64_t k = 0; k < K; ++k) {
      pbar[k] += colp[b * K + k];
      qbar[k] += colq[b * K + k];
    }

  at::Tensor p = P.narrow(0, 0, B), pn = P.narrow(0, B, B), q = Q.narrow(0, 0, B), qn = Q.narrow(0, B, B);
  at::Tensor gp = GP.narrow(0, 0, B), gpn = GP.narrow(0, B, B), gq = GQ.narrow(0, 0, B), gqn = GQ.narrow(0, B, B);
  const double assignment = 0.5 * (cluster_infonce<T>(p, qn, gp, gqn, cluster_tau, 0.5 * w_assignment) +
                                   cluster_infonce<T>(q, pn, gq, gpn, cluster_tau, 0.5 * w_assignment));
  const double center = center_infonce<T>(p, q, uc, vc, gp, gq, cluster_tau, w_center) + sums.second / B;

  // balance: KL(pbar || prior) + KL(qbar || prior), log pbar clamped at the dtype's tiny;
  // d/dpbar_k = log pbar_k + [pbar_k >= tiny] - log prior_k (the clamp passes no gradient)
  const double tiny = static_cast<double>(std::numeric_limits<T>::min());
  const double log_uniform = -std::log(static_cast<double>(K));
  at::Tensor pri;
  if (prior.has_value() && prior->defined()) pri = prior->contiguous();
  const T* pr = pri.defined() ? pri.data_ptr<T>() : nullptr;
  std::vector<T> gbal_p(K), gbal_q(K);
  at::Tensor marginal = at::empty({K}, li.options());
  T* mg = marginal.data_ptr<T>();
  double klp = 0.0, klq = 0.0;
  const double c = w_balance / B;
  for (int64_t k = 0; k < K; ++k) {
    // pbar is rounded to T as the reference's mean is
    const double pk = static_cast<T>(pbar[k] / B), qk = static_cast<T>(qbar[k] / B);
    const double lpi = pr ? std::log(static_cast<double>(pr[k])) : log_uniform;
    const double lp = std::log(std::max(pk, tiny)), lq = std::log(std::max(qk, tiny));
    klp += pk * (lp - lpi);
    klq += qk * (lq - lpi);
    gbal_p[k] = static_cast<T>(c * (lp + (pk >= tiny ? 1.0 : 0.0) - lpi));
    gbal_q[k] = static_cast<T>(c * (lq + (qk >= tiny ? 1.0 : 0.0) - lpi));
    mg[k] = static_cast<T>(0.5 * (pk + qk));
  }
  const double balance = klp + klq;

  backward_rows<T>(s.P, s.GP, B, K, gbal_p.data());
  backward_rows<T>(s.Q, s.GQ, B, K, gbal_q.data());

  const double total = w_instance * instance + w_assignment * assignment + w_center * center + w_balance * balance;
  at::Tensor out = at::empty({5}, li.options().dtype(at::kDouble));
  double* o = out.data_ptr<double>();
  o[0] = total;
  o[1] = instance;
  o[2] = assignment;
  o[3] = center;
  o[4] = balance;
  return {out.to(li.scalar_type()), GP, GQ, P, Q, marginal};
}

}  // namespace

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> fused_step_cpu(
    const at::Tensor& logits_i, const at::Tensor& logits_t, const at::Tensor& u, const at::Tensor& v,
    const c10::optional<at::Tensor>& centers, const c10::optional<at::Tensor>& prior, double cluster_tau,
    double center_tau, double w_instance, double w_assignment, double w_center, double w_balance) {
  check_fused_step_inputs(logits_i, logits_t, u, v);
  check_prior(logits_i, prior);
  std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> out;
  AT_DISPATCH_FLOATING_TYPES(logits_i.scalar_type(), "fused_step_cpu", [&] {
    out = fused_step_impl<scalar_t>(logits_i, logits_t, u, v, centers, prior, cluster_tau, center_tau, w_instance,
                                    w_assignment, w_center, w_balance);
  });
  return out;
}

}  // namespace semclust_ext
