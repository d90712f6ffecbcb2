"""`python -m imgret.bench`: imgret's speed against this machine's limits and the obvious alternatives,
measured side by side in one process. Prints a table of figures and ratios and writes them as JSON.

Parts (choose with --parts):
  extract  per model: imgret's extraction throughput (Lightning loop, data loading included) against the
           model's forward alone on ready tensors and against extraction with the reference decoder (pil),
           interleaved; how much the decoder changes the rows (cosine, recall@10 against the pil rows'
           neighbours); the seed's one-image-at-a-time loop, and the matmul peak
  precision  per model: the forward in bf16-mixed (autocast; AVX512-BF16 where the CPU has it) against fp32,
           interleaved, and what it changes: cosine of each image's two rows, recall@10 of bf16 rows against the
           fp32 rows' exact neighbours
  search   exact search over a 100,000 x 512 gallery: imgret's brute force against the matmul limit and
           faiss.IndexFlatIP; single-query latency against the memory-bandwidth limit (reading the gallery
           once), in alternating blocks
  ivf      the search time imgret reports against a bare faiss call on the same index and queries
  memory   peak RSS of extracting a small and a full gallery (streamed writes: it must not grow)
  ddp      extraction throughput with 1 and with 2 processes (DDP, gloo on the CPU), interleaved and repeated:
           the same real images, model and batch size; each process gets its share of the cores
  verify   what trusting the cache costs: opening (checksum-verifying) a committed store of the search part's
           gallery size, against reading its bytes once
  scale    a 1.28M x 512 synthetic gallery (imgret's store, memory-mapped): time and peak resident set of the exact
           ground truth, the IVF build, IVF search and streamed brute force, each in a fresh process, against
           the gallery's own bytes
"""
