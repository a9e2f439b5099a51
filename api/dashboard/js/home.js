import { setupKey } from "./api.js";

setupKey();
