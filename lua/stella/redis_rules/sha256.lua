-- stella.redis_rules.sha256: SHA-256 (FIPS 180-4) in plain Lua 5.1 over a LuaBitOp-style
-- `bit` library, for the rules inside Redis: Redis's Lua has bit but no SHA-256
-- (redis.sha1hex only), and the store's e-mail hashes are salted SHA-256
-- (stella.store: hash_email, stella.core.sha256 outside Redis). Slow next to the C one;
-- used once per e-mail address a decision looks at.
--
--   local sha256 = require("stella.redis_rules.sha256").new(bit)
--   sha256("abc") -> "ba7816bf...15ad" (64 lowercase hex digits)
--
-- bit: band, bxor, bnot, rshift, ror, tobit and tohex with LuaBitOp's semantics (32-bit
-- results, signed), as in Redis and LuaJIT. Sums of several such words stay exact in a
-- double and are reduced with tobit.
local floor, byte, char, rep, concat = math.floor, string.byte, string.char, string.rep, table.concat

local M = {}

local K = {
  0x428a2f98, 0x71374491, 0xb5c0fbcf, 0xe9b5dba5, 0x3956c25b, 0x59f111f1, 0x923f82a4, 0xab1c5ed5,
  0xd807aa98, 0x12835b01, 0x243185be, 0x550c7dc3, 0x72be5d74, 0x80deb1fe, 0x9bdc06a7, 0xc19bf174,
  0xe49b69c1, 0xefbe4786, 0x0fc19dc6, 0x240ca1cc, 0x2de92c6f, 0x4a7484aa, 0x5cb0a9dc, 0x76f988da,
  0x983e5152, 0xa831c66d, 0xb00327c8, 0xbf597fc7, 0xc6e00bf3, 0xd5a79147, 0x06ca6351, 0x14292967,
  0x27b70a85, 0x2e1b2138, 0x4d2c6dfc, 0x53380d13, 0x650a7354, 0x766a0abb, 0x81c2c92e, 0x92722c85,
  0xa2bfe8a1, 0xa81a664b, 0xc24b8b70, 0xc76c51a3, 0xd192e819, 0xd6990624, 0xf40e3585, 0x106aa070,
  0x19a4c116, 0x1e376c08, 0x2748774c, 0x34b0bcb5, 0x391c0cb3, 0x4ed8aa4a, 0x5b9cca4f, 0x682e6ff3,
  0x748f82ee, 0x78a5636f, 0x84c87814, 0x8cc70208, 0x90befffa, 0xa4506ceb, 0xbef9a3f7, 0xc67178f2,
}
local H0 = { 0x6a09e667, 0xbb67ae85, 0x3c6ef372, 0xa54ff53a, 0x510e527f, 0x9b05688c, 0x1f83d9ab, 0x5be0cd19 }

-- The message's length in bits as 8 big-endian bytes.
local function length_bytes(len)
  local bits, out = len * 8, {}
  for i = 8, 1, -1 do
    out[i] = char(bits % 256)
    bits = floor(bits / 256)
  end
  return concat(out)
end

function M.new(bit)
  local band, bxor, bnot, rshift, ror, tobit, tohex =
        bit.band, bit.bxor, bit.bnot, bit.rshift, bit.ror, bit.tobit, bit.tohex
  local k = {}
  for i = 1, 64 do k[i] = tobit(K[i]) end

  return function(msg)
    local len = #msg
    msg = msg .. "\128" .. rep("\0", (55 - len) % 64) .. length_bytes(len)
    local h1, h2, h3, h4, h5, h6, h7, h8 =
      tobit(H0[1]), tobit(H0[2]), tobit(H0[3]), tobit(H0[4]), tobit(H0[5]), tobit(H0[6]), tobit(H0[7]), tobit(H0[8])
    local w = {}
    for pos = 1, #msg, 64 do
      for j = 1, 16 do
        local p = pos + (j - 1) * 4
        local b1, b2, b3, b4 = byte(msg, p, p + 3)
        w[j] = tobit(b1 * 16777216 + b2 * 65536 + b3 * 256 + b4)
      end
      for j = 17, 64 do
        local x, y = w[j - 15], w[j - 2]
        local s0 = bxor(ror(x, 7), ror(x, 18), rshift(x, 3))
        local s1 = bxor(ror(y, 17), ror(y, 19), rshift(y, 10))
        w[j] = tobit(w[j - 16] + s0 + w[j - 7] + s1)
      end
      local a, b, c, d, e, f, g, h = h1, h2, h3, h4, h5, h6, h7, h8
      for j = 1, 64 do
        local S1 = bxor(ror(e, 6), ror(e, 11), ror(e, 25))
        local ch = bxor(band(e, f), band(bnot(e), g))
        local t1 = h + S1 + ch + k[j] + w[j]
        local S0 = bxor(ror(a, 2), ror(a, 13), ror(a, 22))
        local maj = bxor(band(a, b), band(a, c), band(b, c))
        h, g, f, e, d, c, b, a = g, f, e, tobit(d + t1), c, b, a, tobit(t1 + S0 + maj)
      end
      h1, h2, h3, h4 = tobit(h1 + a), tobit(h2 + b), tobit(h3 + c), tobit(h4 + d)
      h5, h6, h7, h8 = tobit(h5 + e), tobit(h6 + f), tobit(h7 + g), tobit(h8 + h)
    end
    return tohex(h1, 8) .. tohex(h2, 8) .. tohex(h3, 8) .. tohex(h4, 8) ..
           tohex(h5, 8) .. tohex(h6, 8) .. tohex(h7, 8) .. tohex(h8, 8)
  end
end

return M
