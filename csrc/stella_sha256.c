/* stella_sha256.c - SHA-256 (FIPS 180-4), used by the stores to keep customer
 * e-mails as salted hashes rather than in clear. */
#include <string.h>
#include "stella.h"

static const unsigned long K[64] = {
  0x428a2f98UL, 0x71374491UL, 0xb5c0fbcfUL, 0xe9b5dba5UL, 0x3956c25bUL, 0x59f111f1UL,
  0x923f82a4UL, 0xab1c5ed5UL, 0xd807aa98UL, 0x12835b01UL, 0x243185beUL, 0x550c7dc3UL,
  0x72be5d74UL, 0x80deb1feUL, 0x9bdc06a7UL, 0xc19bf174UL, 0xe49b69c1UL, 0xefbe4786UL,
  0x0fc19dc6UL, 0x240ca1ccUL, 0x2de92c6fUL, 0x4a7484aaUL, 0x5cb0a9dcUL, 0x76f988daUL,
  0x983e5152UL, 0xa831c66dUL, 0xb00327c8UL, 0xbf597fc7UL, 0xc6e00bf3UL, 0xd5a79147UL,
  0x06ca6351UL, 0x14292967UL, 0x27b70a85UL, 0x2e1b2138UL, 0x4d2c6dfcUL, 0x53380d13UL,
  0x650a7354UL, 0x766a0abbUL, 0x81c2c92eUL, 0x92722c85UL, 0xa2bfe8a1UL, 0xa81a664bUL,
  0xc24b8b70UL, 0xc76c51a3UL, 0xd192e819UL, 0xd6990624UL, 0xf40e3585UL, 0x106aa070UL,
  0x19a4c116UL, 0x1e376c08UL, 0x2748774cUL, 0x34b0bcb5UL, 0x391c0cb3UL, 0x4ed8aa4aUL,
  0x5b9cca4fUL, 0x682e6ff3UL, 0x748f82eeUL, 0x78a5636fUL, 0x84c87814UL, 0x8cc70208UL,
  0x90befffaUL, 0xa4506cebUL, 0xbef9a3f7UL, 0xc67178f2UL
};

#define ROTR(x, n) ((((x) >> (n)) | ((x) << (32 - (n)))) & 0xffffffffUL)

static void compress(unsigned long h[8], const unsigned char *p) {
  unsigned long w[64], a, b, c, d, e, f, g, hh, t1, t2;
  int i;
  for (i = 0; i < 16; i++)
    w[i] = ((unsigned long)p[4 * i] << 24) | ((unsigned long)p[4 * i + 1] << 16) |
           ((unsigned long)p[4 * i + 2] << 8) | (unsigned long)p[4 * i + 3];
  for (i = 16; i < 64; i++) {
    unsigned long s0 = ROTR(w[i - 15], 7) ^ ROTR(w[i - 15], 18) ^ (w[i - 15] >> 3);
    unsigned long s1 = ROTR(w[i - 2], 17) ^ ROTR(w[i - 2], 19) ^ (w[i - 2] >> 10);
    w[i] = (w[i - 16] + s0 + w[i - 7] + s1) & 0xffffffffUL;
  }
  a = h[0]; b = h[1]; c = h[2]; d = h[3]; e = h[4]; f = h[5]; g = h[6]; hh = h[7];
  for (i = 0; i < 64; i++) {
    t1 = (hh + (ROTR(e, 6) ^ ROTR(e, 11) ^ ROTR(e, 25)) + ((e & f) ^ (~e & g)) + K[i] + w[i]) &
         0xffffffffUL;
    t2 = ((ROTR(a, 2) ^ ROTR(a, 13) ^ ROTR(a, 22)) + ((a & b) ^ (a & c) ^ (b & c))) & 0xffffffffUL;
    hh = g; g = f; f = e; e = (d + t1) & 0xffffffffUL;
    d = c; c = b; b = a; a = (t1 + t2) & 0xffffffffUL;
  }
  h[0] = (h[0] + a) & 0xffffffffUL; h[1] = (h[1] + b) & 0xffffffffUL;
  h[2] = (h[2] + c) & 0xffffffffUL; h[3] = (h[3] + d) & 0xffffffffUL;
  h[4] = (h[4] + e) & 0xffffffffUL; h[5] = (h[5] + f) & 0xffffffffUL;
  h[6] = (h[6] + g) & 0xffffffffUL; h[7] = (h[7] + hh) & 0xffffffffUL;
}

void stella_sha256(const void *data, size_t len, unsigned char out[32]) {
  unsigned long h[8] = { 0x6a09e667UL, 0xbb67ae85UL, 0x3c6ef372UL, 0xa54ff53aUL,
                         0x510e527fUL, 0x9b05688cUL, 0x1f83d9abUL, 0x5be0cd19UL };
  const unsigned char *p = (const unsigned char *)data;
  unsigned char block[128];
  size_t rest, i, total = len;
  int j;
  while (len >= 64) { compress(h, p); p += 64; len -= 64; }
  rest = len;
  memcpy(block, p, rest);
  block[rest++] = 0x80;
  while (rest % 64 != 56) block[rest++] = 0;
  for (j = 7; j >= 0; j--) block[rest++] = (unsigned char)(((unsigned long long)total * 8) >> (8 * j));
  for (i = 0; i < rest; i += 64) compress(h, block + i);
  for (j = 0; j < 8; j++) {
    out[4 * j] = (unsigned char)(h[j] >> 24);
    out[4 * j + 1] = (unsigned char)(h[j] >> 16);
    out[4 * j + 2] = (unsigned char)(h[j] >> 8);
    out[4 * j + 3] = (unsigned char)h[j];
  }
}
