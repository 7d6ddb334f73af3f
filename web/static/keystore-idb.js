// The page's key storage: IndexedDB, on this origin only. The secret key never leaves it except
// into the worker's SEAL; what is uploaded is the public bundle.

const DB = "encinfer", STORE = "keys";

function open() {
  return new Promise((resolve, reject) => {
    const req = indexedDB.open(DB, 1);
    req.onupgradeneeded = () => req.result.createObjectStore(STORE);
    req.onsuccess = () => resolve(req.result);
    req.onerror = () => reject(req.error);
  });
}

async function run(mode, fn) {
  const db = await open();
  try {
    return await new Promise((resolve, reject) => {
      const tx = db.transaction(STORE, mode);
      const req = fn(tx.objectStore(STORE));
      tx.oncomplete = () => resolve(req.result);
      tx.onerror = () => reject(tx.error);
    });
  } finally {
    db.close();
  }
}

export const getKeys = (name) => run("readonly", (s) => s.get(name));
export const putKeys = (name, value) => run("readwrite", (s) => s.put(value, name));
export const deleteKeys = (name) => run("readwrite", (s) => s.delete(name));
