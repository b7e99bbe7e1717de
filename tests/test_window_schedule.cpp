#include <cbq/pass/window_schedule.hpp>

#include "support/gradcheck.hpp"

using namespace cbq;

TEST_CASE("window schedule: the paper's default B=2, O=1 on 5 blocks") {
  auto w = window_schedule(5, 2, 1);
  REQUIRE(w.size() == 4);
  CHECK(w[0].first == 0);
  CHECK(w[0].last == 1);
  CHECK(w[0].finalize == 1);
  CHECK(w[3].first == 3);
  CHECK(w[3].last == 4);
  CHECK(w[3].finalize == 5);
}

TEST_CASE("window schedule: covers every block and finalizes each exactly once, all B and O < B") {
  for (int64_t K = 1; K <= 12; ++K)
    for (int64_t B = 1; B <= K; ++B)
      for (int64_t O = 0; O < B; ++O) {
        CAPTURE(K);
        CAPTURE(B);
        CAPTURE(O);
        auto ws = window_schedule(K, B, O);
        std::vector<int> trained(static_cast<size_t>(K), 0), finalized(static_cast<size_t>(K), 0);
        int64_t finalized_up_to = 0;
        for (size_t i = 0; i < ws.size(); ++i) {
          const Window& w = ws[i];
          CHECK(w.size() == B);
          CHECK(w.first >= finalized_up_to);  // never trains a frozen block
          CHECK(w.finalize > w.first);        // every window freezes at least one block
          CHECK(w.finalize <= w.last + 1);
          if (i > 0) CHECK(w.first - ws[i - 1].first <= B - O);  // stride at most B − O
          if (i + 2 < ws.size()) CHECK(w.first + B - O == ws[i + 1].first);  // last sits at K − B
          for (int64_t b = w.first; b <= w.last; ++b) trained[static_cast<size_t>(b)]++;
          for (int64_t b = finalized_up_to; b < w.finalize; ++b)
            finalized[static_cast<size_t>(b)]++;
          finalized_up_to = w.finalize;
        }
        CHECK(ws.back().last == K - 1);
        for (int64_t b = 0; b < K; ++b) {
          CHECK(trained[static_cast<size_t>(b)] >= 1);
          CHECK(finalized[static_cast<size_t>(b)] == 1);
        }
      }
}

TEST_CASE("window schedule: overlap ≥ blocks and windows larger than the model are clear errors") {
  CHECK_THROWS_WITH_AS(window_schedule(5, 2, 2), doctest::Contains("overlap 2 must be in [0, 2)"),
                       cbq::Error);
  CHECK_THROWS_WITH_AS(window_schedule(3, 4, 1),
                       doctest::Contains("windows of 4 blocks but the model has only 3 blocks"),
                       cbq::Error);
}
